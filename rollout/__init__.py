"""Rollout side: prompts, vLLM engines, sampling, teacher scoring, weight loading."""
