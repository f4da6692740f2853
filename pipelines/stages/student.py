"""Stage 2: Diffusion Forcing pretraining of the causal student.

Every chunk of 3 latent frames is noised at its own time, drawn from the student's inference list
{0.999, 0.769}, so the student trains only at the noise levels it meets when streaming. Each step
uses one of several (window, sink) block-causal attention layouts, the same on every rank.
"""

from __future__ import annotations

import torch

from lipforcing.diffusion.schedules import add_noise, chunk_timesteps
from lipforcing.inference.streaming import stream_generate
from lipforcing.losses.flow_matching import flow_matching_loss
from lipforcing.models import build_student
from pipelines.stages.common import DiffusionStage, seeded_choice


class StudentDiffusionForcing(DiffusionStage):
    name = "student"

    def networks(self):
        config = self.context.config
        return {"student": self.adapt(build_student(config.model, device="cpu", weights=self.student_base()))}

    def step(self, engines, batch, iteration):
        config = self.context.config
        encoded = self.encode(batch)
        x0 = encoded.x0
        generator = torch.Generator().manual_seed(config.seed * 7919 + iteration * 31 + self.context.rank)
        t = chunk_timesteps(x0.shape[0], x0.shape[2], config.model.chunk_frames, config.model.student_timesteps, generator)
        t = t.to(x0.device)
        layouts = config.model.training_attention_layouts
        window, sink = layouts[seeded_choice(config.seed, iteration, len(layouts))]
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        engine = engines["student"]
        velocity = engine(add_noise(x0, noise, t), t, encoded.cond, window_frames=window, sink_frames=sink)
        loss = flow_matching_loss(velocity, x0, noise)
        engine.backward(loss)
        engine.step()
        return {"loss": loss.item(), "window_frames": float(window), "sink_frames": float(sink)}

    def generate(self, engines, cond, negative_text, generator):
        chunks = stream_generate(engines["student"].module, cond, generator=generator)
        return torch.cat([chunk.latents for chunk in chunks], dim=2)

    def finish(self, engines, output_dir):
        self.export(engines["student"].module, output_dir)
        self.render_samples(engines, output_dir, self.name)
        return {}
