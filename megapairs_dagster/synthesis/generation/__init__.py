"""Two-step instruction generation (MLLM description → LLM instructions), framework-free."""
