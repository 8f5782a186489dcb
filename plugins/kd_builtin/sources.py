"""Sources: where a step's rows come from.

- ``dataset`` (the default): the packed samples themselves, exactly as without sources.
- ``on-policy``: each sample's prompt (its first ``prompt_tokens`` tokens, or a chat sample's user turns
  and assistant header), continued by the student; the teacher's distribution is distilled on the
  generated tokens only, by the divergence alone (they have no gold label).
- ``mixed``: each sample on-policy with probability ``fraction`` (GKD's λ_on), else its dataset text.
- ``teacher-generated``: the teacher continues the prompt (sequence-level KD); its tokens are labels.

The request writes the continuations (with the KV cache, seeded by ``(seed, step, sample id)``, in eval
mode, without gradient), so these classes only decide which model continues which prompt. Torch is
not imported here: ``kd list-plugins`` loads this module without it.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from kdcore import KdError, Source, SourceContext, SourceRequest, SourceRows, hookimpl


class GenerationParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt_tokens: int = Field(
        32, ge=2, description="prompt length of a text sample (a chat sample brings its own prompt)"
    )
    max_new_tokens: int = Field(32, ge=1, description="the longest continuation, EOS included")
    temperature: float = Field(1.0, ge=0, description="sampling temperature (0: greedy)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus: the most likely tokens holding this mass")


class MixedParams(GenerationParams):
    fraction: float = Field(0.5, ge=0, le=1, description="probability that a sample is on-policy")


class TeacherGenerationParams(GenerationParams):
    temperature: float = Field(0.0, ge=0, description="sampling temperature (0: greedy, the teacher's mode)")


class DatasetSource(Source):
    """The dataset's text: every sample as packed (the default)."""

    def generates(self) -> bool:
        return False

    def rows(self, request: SourceRequest) -> SourceRows:
        return request.dataset


class OnPolicySource(Source):
    """The student's own continuations of each sample's prompt, scored by the teacher (divergence alone)."""

    Params = GenerationParams
    #: The registered name, for messages.
    name: ClassVar[str] = "on-policy"

    def has_labels(self) -> bool:
        return False

    def check(self, ctx: SourceContext) -> None:
        p = self.params
        prompt = ctx.longest_prompt if ctx.longest_prompt is not None else min(p.prompt_tokens, ctx.seq_len)
        if ctx.max_positions is not None and prompt + p.max_new_tokens > ctx.max_positions:
            raise KdError(
                f"source '{self.name}': a prompt of {prompt} tokens and max_new_tokens {p.max_new_tokens} "
                f"exceed the models' {ctx.max_positions} positions; lower max_new_tokens or prompt_tokens"
            )

    def continue_prompts(self, request: SourceRequest, lengths, model, labelled: bool) -> SourceRows:
        p = self.params
        return request.generate(
            model,
            lengths,
            max_new_tokens=p.max_new_tokens,
            temperature=p.temperature,
            top_p=p.top_p,
            labelled=labelled,
        )

    def rows(self, request: SourceRequest) -> SourceRows:
        lengths = request.prompts(self.params.prompt_tokens)
        return self.continue_prompts(request, lengths, request.student, labelled=False)


class MixedSource(OnPolicySource):
    """Each sample on-policy with probability fraction (GKD's λ_on), else its dataset text."""

    Params = MixedParams
    name: ClassVar[str] = "mixed"

    def generates(self) -> bool:
        return self.params.fraction > 0

    def has_labels(self) -> bool:
        return self.params.fraction < 1

    def rows(self, request: SourceRequest) -> SourceRows:
        fraction = self.params.fraction
        if fraction == 0:  # nothing drawn, nothing generated: the dataset run, bit for bit
            return request.dataset
        on_policy = request.coin("mixed") < fraction
        lengths = request.prompts(self.params.prompt_tokens) * on_policy  # 0 keeps the dataset row
        return self.continue_prompts(request, lengths, request.student, labelled=False)


class TeacherGeneratedSource(OnPolicySource):
    """The teacher's continuations of each sample's prompt (sequence-level KD): CE and KD on its tokens."""

    Params = TeacherGenerationParams
    name: ClassVar[str] = "teacher-generated"

    def has_labels(self) -> bool:
        return True

    def rows(self, request: SourceRequest) -> SourceRows:
        if request.teacher is None:
            raise KdError(f"source '{self.name}' needs the teacher model; drop --teacher-cache")
        lengths = request.prompts(self.params.prompt_tokens)
        return self.continue_prompts(request, lengths, request.teacher, labelled=True)


@hookimpl
def kd_register_sources(register):
    register("dataset", DatasetSource)
    register("on-policy", OnPolicySource)
    register("mixed", MixedSource)
    register("teacher-generated", TeacherGeneratedSource)
