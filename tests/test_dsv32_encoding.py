"""DeepSeek-V3.2's conversation format (gasungbi.data.dsv32) against the examples DeepSeek publishes
with its encoder, and its replies parsed back."""

import json
from pathlib import Path

from gasungbi.data.dsv32 import BOS, encode_messages, parse_completion

DATA = Path(__file__).parent / "data" / "deepseek_v32"


def test_published_example_with_tools_results_and_reasoning():
    example = json.loads((DATA / "test_input.json").read_text(encoding="utf-8"))
    want = (DATA / "test_output.txt").read_text(encoding="utf-8").strip()
    assert encode_messages(example["messages"], thinking=True, tools=example["tools"]) == want


def test_thinking_and_chat_modes_of_the_release_readme():
    messages = [{"role": "user", "content": "hello"},
                {"role": "assistant", "content": "Hello! I am DeepSeek.", "reasoning_content": "thinking..."},
                {"role": "user", "content": "1+1=?"}]
    turns = "<｜User｜>hello<｜Assistant｜></think>Hello! I am DeepSeek.<｜end▁of▁sentence｜><｜User｜>1+1=?<｜Assistant｜>"
    assert encode_messages(messages, thinking=True) == BOS + turns + "<think>"
    assert encode_messages(messages, thinking=False) == BOS + turns + "</think>"


def test_a_reply_parses_into_reasoning_content_and_calls():
    reply = ("Need the tool.</think>\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name=\"get_weather\">\n"
             "<｜DSML｜parameter name=\"city\" string=\"true\">Beijing</｜DSML｜parameter>\n"
             "<｜DSML｜parameter name=\"days\" string=\"false\">2</｜DSML｜parameter>\n</｜DSML｜invoke>\n"
             "</｜DSML｜function_calls><｜end▁of▁sentence｜>")
    msg = parse_completion(reply, thinking=True)
    assert msg["reasoning_content"] == "Need the tool." and msg["content"] == ""
    assert msg["tool_calls"] == [{"name": "get_weather", "arguments": json.dumps({"city": "Beijing", "days": 2})}]
    # the call rendered back is the reply's text
    history = [{"role": "user", "content": "Weather in Beijing for 2 days?"},
               {"role": "assistant", "reasoning_content": "Need the tool.",
                "tool_calls": [{"type": "function", "function": msg["tool_calls"][0]}]}]
    assert encode_messages(history, thinking=True).endswith("<｜Assistant｜><think>" + reply)
