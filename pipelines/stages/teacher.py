"""Stage 1: the bidirectional teacher, trained with flow matching on the V2V inpainting task.

Audio dropout trains the null condition (zero audio, negative text) that classifier-free guidance
needs. With a pretrained base (1.3b / 14b) only LoRA adapters and the audio and patch modules
train. The tiny profile has no pretrained base, so `TeacherBase` first trains it in full from
random init; the LoRA step then runs exactly as at scale.
"""

from __future__ import annotations

import torch

from lipforcing.diffusion.samplers import sample_teacher
from lipforcing.diffusion.schedules import add_noise, sample_training_timesteps
from lipforcing.losses.flow_matching import flow_matching_loss
from lipforcing.models import build_teacher
from lipforcing.models.conditioning import Condition
from pipelines.stages.common import DiffusionStage


def drop_audio(cond: Condition, negative_text: torch.Tensor, probability: float, generator: torch.Generator) -> Condition:
    """Replace the condition of a random share of samples by the null condition."""
    null = cond.null(negative_text)
    drop = torch.rand(cond.audio.shape[0], generator=generator) < probability
    if not drop.any():
        return cond
    pick = drop.to(cond.audio.device)
    return Condition(
        reference=cond.reference,
        mask=cond.mask,
        masked_video=cond.masked_video,
        audio=torch.where(pick[:, None, None], null.audio, cond.audio),
        text=torch.where(pick[:, None, None], null.text, cond.text),
        reference_sequence=cond.reference_sequence,
    )


class TeacherBase(DiffusionStage):
    """Full training of a randomly initialised base (only for profiles without pretrained weights)."""

    name = "teacher_base"
    network = "base"

    def networks(self):
        return {self.network: self.build()}

    def build(self) -> torch.nn.Module:
        return build_teacher(self.context.config.teacher_model, device="cpu")

    def step(self, engines, batch, iteration, micro):
        encoded = self.encode(batch)
        generator = self.context.generator(iteration, micro)
        cond = drop_audio(encoded.cond, encoded.negative_text, self.context.config.teacher.audio_dropout, generator)
        t = sample_training_timesteps((encoded.x0.shape[0],), self.context.config.model.shift, generator).to(encoded.x0.device)
        noise = torch.randn(encoded.x0.shape, generator=generator).to(encoded.x0.device)
        engine = engines[self.network]
        velocity = engine(add_noise(encoded.x0, noise, t), t, cond)
        loss = flow_matching_loss(velocity, encoded.x0, noise)
        engine.backward(loss)
        return {f"{self.network}_loss": loss.item()}

    def generate(self, engines, cond, negative_text, generator):
        model = self.context.config.teacher_model
        noise = torch.randn(cond.masked_video.shape, generator=generator, device=cond.masked_video.device)
        return sample_teacher(
            engines[self.network].module, noise, cond, cond.null(negative_text),
            model.guidance_scale, model.teacher_steps, model.shift,
        ).latents  # fmt: skip

    def finish(self, engines, output_dir):
        self.export(engines[self.network].module, output_dir)
        self.render_samples(engines, output_dir, self.name)
        return {}


class TeacherLora(TeacherBase):
    """The LoRA finetune: adapters on the base (pretrained weights or the tiny base from above)."""

    name = "teacher"
    network = "teacher"

    def build(self) -> torch.nn.Module:
        config = self.context.config
        base = self.weights("teacher_base") if config.teacher.base.steps > 0 else None
        return self.adapt(build_teacher(config.teacher_model, device="cpu", weights=base))
