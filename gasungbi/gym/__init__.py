"""The reasoning gym (nanochat's ``tasks/``): task families whose answers a program can check,
their rule-based rewards (DeepSeek-R1's accuracy and format rewards), and cold-start SFT traces.

Pure Python, no torch: post-training (``gasungbi.post``) and evaluation (``gasungbi.eval``) use it.
"""
