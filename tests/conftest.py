"""Fixtures shared by the test files: a tiny tokenizer, model and checkpoint, one torch thread, and a
real ``gasungbi serve`` subprocess (``start_server``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import gasungbi

DOCS = ["the quick brown fox jumps over the lazy dog. " * 5, "안녕하세요 세계, hello world! " * 5,
        "def f(x):\n    return x + 1\n" * 5]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models decode in ~1 ms per token on one thread; with two OpenMP threads on a shared
    2-core machine every op can wait milliseconds for the other thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tokenizer():
    """gasungbi's byte-level BPE (400 tokens) trained on English, Korean and code."""
    from gasungbi.data.tokenizer import train_tokenizer
    return train_tokenizer(DOCS, 400)


@pytest.fixture(scope="module")
def model(tokenizer):
    """The ``debug`` preset over that vocabulary, with large weights (every layer moves the logits)."""
    cfg = gasungbi.get_preset("debug").replace(vocab_size=tokenizer.get_vocab_size(), initializer_range=0.25)
    return gasungbi.build_model(cfg, seed=0).eval()


@pytest.fixture(scope="module")
def checkpoint(model, tokenizer, tmp_path_factory):
    """``model`` and ``tokenizer`` saved as a checkpoint directory."""
    from gasungbi.data.tokenizer import save_tokenizer
    path = tmp_path_factory.mktemp("serve") / "tiny"
    save_tokenizer(tokenizer, path.parent / "tok")
    gasungbi.save_model(model, path, tokenizer=path.parent / "tok")
    return path


@pytest.fixture(scope="module")
def code_shards(tmp_path_factory):
    """Token shards (350-token BPE, 10% validation) of 3,000 small generated Python functions."""
    from gasungbi.data.prepare import prepare_corpus
    root = tmp_path_factory.mktemp("code")
    src = root / "c.txt"
    src.write_text("\n\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}  # {'ab' * (i % 5)}" for i in range(3000)))
    prepare_corpus(str(src), root / "shards", vocab_size=350, val_fraction=0.1, progress=False)
    return root / "shards"


def _cpu_seconds(pid: int) -> float | None:
    """CPU seconds a process has used (user + system, its reaped children included), from /proc;
    None where /proc is not there."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def wait_for(ready, proc: subprocess.Popen, what: str, log: Path | None = None, stall_s: float = 120.0):
    """Poll ``ready()`` until it is true, following the process rather than a wall clock: fails when
    ``proc`` exits first, or shows no sign of life (no CPU time used, nothing new in ``log``) for
    ``stall_s`` seconds. A slow or busy machine only makes the wait longer."""
    last, alive_at = None, time.monotonic()
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited ({proc.returncode}) first"
                                 + (f"\n{log.read_text()}" if log else ""))
        sign, now = (_cpu_seconds(proc.pid), log.stat().st_size if log and log.exists() else None), time.monotonic()
        if sign != last:
            last, alive_at = sign, now
        elif now - alive_at > stall_s:
            raise TimeoutError(f"{what}: no sign of life for {stall_s:.0f} s" + (f"\n{log.read_text()}" if log else ""))
        time.sleep(0.05)


class Server:
    """``gasungbi serve CHECKPOINT ARGS`` in a subprocess on a free loopback port; ``url`` once /health
    answers (:func:`wait_for`: as long as the server starting up is alive)."""

    def __init__(self, checkpoint: Path, *args: str, env: dict | None = None):
        import httpx

        self.log = checkpoint.parent / f"server-{time.monotonic_ns()}.log"
        base = {k: v for k, v in os.environ.items() if k != "GASUNGBI_API_KEY"}
        env = dict(base, OMP_NUM_THREADS="1", **(env or {}))
        key = env.get("GASUNGBI_API_KEY")
        self.auth = {"Authorization": f"Bearer {key}"} if key else {}
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "gasungbi", "serve", str(checkpoint), "--port", "0",
                                          "--threads", "1", *args], stdout=f, stderr=subprocess.STDOUT, env=env)
        try:
            wait_for(lambda: re.search(r"at (http://127\.0\.0\.1:\d+)", self.log.read_text()) is not None,
                     self.proc, "the server's start", self.log)
            self.url = re.search(r"at (http://127\.0\.0\.1:\d+)", self.log.read_text()).group(1)
            wait_for(lambda: httpx.get(self.url + "/health").status_code == 200, self.proc, "/health", self.log)
        except BaseException:
            self.close()
            raise

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def metrics(self) -> dict[str, float]:
        import httpx

        text = httpx.get(self.url + "/metrics", headers=self.auth).text
        return {k: float(v) for k, v in re.findall(r"^(\w+(?:\{[^}]*\})?) (\S+)$", text, re.M)}


@pytest.fixture(scope="module")
def start_server():
    """``start_server(checkpoint, *args, env=None) -> Server``; every server started is stopped when
    the module's tests are done."""
    pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    started: list[Server] = []

    def start(checkpoint: Path, *args: str, env: dict | None = None) -> Server:
        started.append(Server(checkpoint, *args, env=env))
        return started[-1]

    yield start
    for s in started:
        s.close()


def chat_reference(model, tokenizer, messages, n: int):
    """What the server's chat endpoint must answer: greedy generation on gasungbi's chat template."""
    from gasungbi.data.conventions import END, render_chat
    from gasungbi.infer.generate import generate

    ids = tokenizer.encode(render_chat(messages)).ids
    stops = [tokenizer.token_to_id(END), model.config.eos_token_id]
    return generate(model, [ids], max_new_tokens=n, stop_tokens=stops, tokenizer=tokenizer)[0]


@pytest.fixture(scope="module")
def chat_ref():
    """:func:`chat_reference` as a fixture, for test files (which do not import each other)."""
    return chat_reference


# A process that has imported torch and gasungbi's CLI, then forks one child per command: the child
# runs `python -m gasungbi ARGS` (gasungbi.cli.main, then a normal interpreter exit) with its own
# stdin, stdout, stderr, working directory and environment, so each command is still a process of
# its own with a real exit status, without paying the 3-5 s of importing torch and the 1.7 s of
# tearing it down each time. It never runs a torch op before forking (OpenMP's threads do not
# survive a fork).
_CLI_SERVER = r"""
import atexit, gc, json, os, signal, sys, threading, time, traceback
import torch, tyro, gasungbi.cli  # noqa: F401  (imported once, shared by every forked command)
import torch._dynamo, gasungbi.infer.generate, gasungbi.train.trainer  # noqa: F401  (2 s of the commands' own imports)
for name in gasungbi.cli.COMMANDS:
    gasungbi.cli._target(name)
for line in sys.stdin:
    req = json.loads(line)
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.chdir(req["cwd"])
        os.environ.clear(); os.environ.update(req["env"])
        for fd, (path, mode) in enumerate([(os.devnull, os.O_RDONLY), (req["out"], os.O_WRONLY), (req["err"], os.O_WRONLY)]):
            os.dup2(os.open(path, mode), fd)
        sys.argv = [sys.executable + " -m gasungbi", *req["args"]]
        try:
            code = gasungbi.cli.main(req["args"])
        except SystemExit as e:
            code = e.code
        except BaseException:
            traceback.print_exc()
            code = 1
        if code is None:  # as sys.exit() treats it
            code = 0
        elif not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
        # a normal exit, less the 1.7 s of tearing down torch's modules: threads, atexit, garbage, streams
        for t in threading.enumerate():
            if t is not threading.main_thread() and not t.daemon:
                t.join()
        atexit._run_exitfuncs()
        gc.collect()
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    deadline, timed_out = time.monotonic() + req["timeout"], False
    while not (done := os.waitpid(pid, os.WNOHANG))[0]:
        if time.monotonic() > deadline:  # as subprocess.run(timeout=...) does: kill it, then report
            os.kill(pid, signal.SIGKILL)
            done, timed_out = os.waitpid(pid, 0), True
            break
        time.sleep(0.01)
    print(json.dumps({"status": os.waitstatus_to_exitcode(done[1]), "timed_out": timed_out}), flush=True)
"""


class _CLI:
    """``python -m gasungbi ARGS`` as a user runs it, one process per command (see ``_CLI_SERVER``)."""

    def __init__(self):
        self.server: subprocess.Popen | None = None

    def __call__(self, *args, timeout: float = 300) -> subprocess.CompletedProcess:
        import json
        import tempfile

        if self.server is None or self.server.poll() is not None:
            self.server = subprocess.Popen([sys.executable, "-c", _CLI_SERVER], stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, text=True)
        args = [str(a) for a in args]
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            out.touch(), err.touch()
            self.server.stdin.write(json.dumps({"args": args, "cwd": os.getcwd(), "env": dict(os.environ),
                                                "out": str(out), "err": str(err), "timeout": timeout}) + "\n")
            self.server.stdin.flush()
            reply = json.loads(self.server.stdout.readline())
            if reply["timed_out"]:
                raise subprocess.TimeoutExpired(["gasungbi", *args], timeout, out.read_text(), err.read_text())
            return subprocess.CompletedProcess(["gasungbi", *args], reply["status"], out.read_text(), err.read_text())

    def close(self):
        if self.server is not None:
            self.server.stdin.close()
            self.server.wait(timeout=30)
            self.server.stdout.close()


_run_cli = _CLI()


def _one_line_error(r: subprocess.CompletedProcess, command: str) -> str:
    """The error line of a failed command, checked to be the only one and no traceback."""
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith(f"gasungbi {command}: error: ")]
    assert len(errors) == 1, r.stderr
    return errors[0]


@pytest.fixture(scope="session")
def cli():
    """``cli(*args, timeout=300)``: ``python -m gasungbi ARGS`` as a user runs it (a CompletedProcess),
    in a process forked from one that has imported torch already (``_CLI_SERVER``)."""
    yield _run_cli
    _run_cli.close()


@pytest.fixture(scope="session")
def one_line_error():
    """``one_line_error(result, command)``: a failed command's one error line (exit 2, no traceback)."""
    return _one_line_error


# DeepSeek-V4 (spec: every kind of layer, a window of 4 < 40 tokens, CSA at 2 with its indexer keeping 2 of up
# to 20 entries (16 indexer heads: no ties), HCA at 4, two hash layers, YaRN on the compressed layers, a clamp
# that bites at this scale)
V4 = dict(vocab_size=97, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=4, num_attention_heads=4,
          head_dim=16, partial_rotary_factor=0.5, q_lora_rank=24, n_routed_experts=8, n_shared_experts=1,
          num_experts_per_tok=2, routed_scaling_factor=1.5, o_groups=2, o_lora_rank=8, index_n_heads=16,
          index_head_dim=64, index_topk=2, sliding_window=4,
          compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 4},
          layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                       "compressed_sparse_attention"], mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"],
          hc_mult=4, hc_sinkhorn_iters=3, hc_eps=1e-6, swiglu_limit=0.5, rope_theta=10000.0,
          compress_rope_theta=160000.0, max_position_embeddings=256,
          rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                           "beta_fast": 32, "beta_slow": 1})


def v4_reference(seed: int = 0, **changes):
    """transformers' DeepseekV4ForCausalLM (eager attention) with random values where it initializes
    constants: sinks, position biases, hyper-connection bases and scales, correction biases, norms, and a
    token -> distinct experts table for the hash layers."""
    import transformers

    cfg = transformers.DeepseekV4Config(**{**V4, **changes})
    torch.manual_seed(seed)
    model = transformers.DeepseekV4ForCausalLM._from_config(cfg, attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if "inv_freq" in name or not p.dtype.is_floating_point:
                continue
            if p.ndim == 1 and ("norm" in name or name.endswith("scale")):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):
                E = cfg.n_routed_experts
                b.copy_(torch.stack([torch.randperm(E, generator=g)[: b.shape[1]] for _ in range(b.shape[0])]))
    return model
