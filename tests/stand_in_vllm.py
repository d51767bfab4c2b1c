"""A stand-in for the ``vllm`` module where no vLLM build can run the model: the description
step's MLLM (vLLM's CPU build needs a CPU torchvision that does not exist for its torch) and
the project's own environment, which has no vLLM at all. It records what the backend hands
the engine and answers each prompt with a 20-word text naming the request's seed; the real
engine is tested in test_generation_vllm_engine.py. Its tokenizer (``get_tokenizer``) is the
tests' offline byte-level BPE with a chat template (``tiny_hf_models.build_tokenizer``).

Install it with ``monkeypatch.setitem(sys.modules, "vllm", StandInVLLM())``.
"""

from __future__ import annotations

import types
from dataclasses import dataclass


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    n: int = 1


class StandInVLLM(types.ModuleType):
    def __init__(self):
        super().__init__("vllm")
        self.engines: list[StandInLLM] = []
        self.SamplingParams = SamplingParams
        module = self

        class LLM(StandInLLM):
            def __init__(self, model: str, **engine_args):
                super().__init__(model, engine_args)
                module.engines.append(self)

        self.LLM = LLM


class StandInLLM:
    def __init__(self, model: str, engine_args: dict):
        self.model = model
        self.engine_args = engine_args
        self.calls: list[tuple[list, list]] = []  # (conversations, sampling params) per chat
        self.generated: list[tuple[list, list]] = []  # (prompts, sampling params) per generate
        self._tokenizer = None
        self.shutdowns = 0
        self.llm_engine = types.SimpleNamespace(
            engine_core=types.SimpleNamespace(shutdown=self._shutdown)
        )

    def _shutdown(self):
        self.shutdowns += 1

    def get_tokenizer(self):
        if self._tokenizer is None:
            from tiny_hf_models import build_tokenizer

            self._tokenizer = build_tokenizer()
        return self._tokenizer

    def generate(self, prompts, sampling_params, use_tqdm=True):
        assert self.shutdowns == 0, "generate after shutdown"
        self.generated.append((prompts, sampling_params))
        return self._answers(sampling_params)

    def chat(self, conversations, sampling_params, use_tqdm=True):
        assert self.shutdowns == 0, "chat after shutdown"
        self.calls.append((conversations, sampling_params))
        return self._answers(sampling_params)

    @staticmethod
    def _answers(sampling_params):
        return [
            types.SimpleNamespace(outputs=[types.SimpleNamespace(
                text=f"Both images share one scene, drawn for seed {params.seed}; the second "
                     "one changes its colour and its size a little."
            )])
            for params in sampling_params
        ]
