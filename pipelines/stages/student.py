"""Stage 2: Diffusion Forcing pretraining of the causal student.

Every chunk of 3 latent frames is noised to its own level, drawn from `student.noise_levels`
(released: {0.999, 0.769, 0.0}, so a third of the chunks are clean context, as in streaming), and
the loss is 0.5 * MSE on the clean estimate (`lipforcing/losses/diffusion_forcing.py`). Each
micro-batch uses one of several (window, sink) block-causal attention layouts, the same on every rank.
"""

from __future__ import annotations

import torch

from lipforcing.inference.streaming import stream_generate
from lipforcing.losses.diffusion_forcing import diffusion_forcing_loss
from lipforcing.models import build_student
from pipelines.stages.common import DiffusionStage


class StudentDiffusionForcing(DiffusionStage):
    name = "student"

    def networks(self):
        config = self.context.config
        return {"student": self.adapt(build_student(config.model, device="cpu", weights=self.student_base()))}

    def step(self, engines, batch, iteration, micro):
        config = self.context.config
        encoded = self.encode(batch)
        layouts = config.model.training_attention_layouts
        window, sink = layouts[self.context.shared_choice(iteration, micro, len(layouts))]
        loss = diffusion_forcing_loss(
            engines["student"], encoded.x0, encoded.cond, config.student.noise_levels, config.model.chunk_frames,
            (window, sink), self.context.generator(iteration, micro), config.student.loss,
        )  # fmt: skip
        engines["student"].backward(loss)
        return {"loss": loss.item(), "window_frames": float(window), "sink_frames": float(sink)}

    def generate(self, engines, cond, negative_text, generator):
        return stream_student(engines["student"].module, cond, generator)

    def finish(self, engines, output_dir):
        self.export(engines["student"].module, output_dir)
        self.render_samples(engines, output_dir, self.name)
        return {}


def stream_student(student: torch.nn.Module, cond, generator: torch.Generator) -> torch.Tensor:
    """A whole clip streamed chunk by chunk with the two-step schedule: clean latents [1, 16, F, h, w]."""
    return torch.cat([chunk.latents for chunk in stream_generate(student, cond, generator=generator)], dim=2)
