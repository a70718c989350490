"""Reward functions a recipe can point at, e.g. `python:reward_models/demo_task.py:reward`.

Each module stands alone (no `bitnet_rl` import) so it can be copied as a starting point.
"""
