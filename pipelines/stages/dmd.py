"""Stage 3: Self Forcing rollout + Sync-Window DMD + SyncNet reward.

Each iteration the student generates the clip chunk by chunk from its own outputs with the
two-step schedule; the exit step (the same for every chunk, drawn per iteration and identical on
all ranks) is the only one that keeps gradients, and each clean chunk is written to the KV cache.
The fake score (a bidirectional copy with its own LoRA) is updated every iteration on the detached
rollout; every `student_every`-th iteration the student takes the DMD step against the frozen
teacher, whose CFG scale is 4.5 only when the re-noising time lies in the ODE-step 20..40 band,
weighted per sample by exp(beta * Sync-C) of the TAE-decoded rollout.
"""

from __future__ import annotations

import numpy as np
import torch

from lipforcing.diffusion.samplers import cfg_combine
from lipforcing.diffusion.schedules import (
    add_noise,
    shift_time,
    sync_window,
    sync_window_scale,
    x0_from_velocity,
)
from lipforcing.inference.streaming import denoise_chunk, split_chunks
from lipforcing.losses.dmd import dmd_loss_per_sample, fake_score_loss, student_updates_at
from lipforcing.losses.reward import reward_weights, weighted_loss
from lipforcing.models import build_student, build_tae, build_teacher
from lipforcing.models.conditioning import Condition
from lipforcing.models.syncnet import SyncNetConfig, load_syncnet, score_clip
from pipelines.deepspeed_setup import gathered
from pipelines.stages.common import DiffusionStage, seeded_choice
from pipelines.stages.student import StudentDiffusionForcing


def rollout(student, cond: Condition, shape: tuple, timesteps: list[float], exit_index: int, generator: torch.Generator) -> torch.Tensor:
    """Self Forcing: generate all chunks autoregressively; gradients only through the exit step."""
    cache = student.new_cache()
    chunks = []
    device = cond.masked_video.device
    for chunk_cond in split_chunks(cond, student.cfg.chunk_frames):
        noise = torch.randn((shape[0], shape[1], chunk_cond.masked_video.shape[2], *shape[3:]), generator=generator, device=device)
        x0 = denoise_chunk(student, noise, chunk_cond, cache, timesteps, generator, exit_index, grad=torch.is_grad_enabled())
        chunks.append(x0)
        with torch.no_grad():
            student.cache_clean_chunk(x0.detach(), chunk_cond, cache)
    return torch.cat(chunks, dim=2)


def dmd_timesteps(batch: int, index_range: list[int], shift: float, generator: torch.Generator) -> torch.Tensor:
    """Re-noising times: an index uniform in [20, 980] of 1000, mapped through the shifted schedule."""
    low, high = index_range
    index = torch.randint(low, high + 1, (batch,), generator=generator).double()
    return shift_time(index / 1000.0, shift).float()


class DistributionMatching(DiffusionStage):
    name = "dmd"
    whole_networks = ("student",)  # the fake score is neither exported nor rendered

    def __init__(self, context):
        super().__init__(context)
        config = context.config
        self.teacher = build_teacher(config.teacher_model, device="cpu", weights=self.weights("teacher")).to(context.device).eval()
        self.teacher.requires_grad_(False)
        self.tae = build_tae(config.model).to(context.device).eval()  # the reward's, also the previews'
        self.syncnet = load_syncnet(SyncNetConfig(weights=config.dmd.syncnet), key="dmd.syncnet") if config.dmd.syncnet else None
        self.window = sync_window(*config.dmd.window_steps, num_steps=config.model.teacher_steps, shift=config.model.shift)
        self.counters = {"updates_student": 0, "updates_fake_score": 0}
        self.cfg_samples = self.dmd_samples = 0
        self.ema: dict[str, torch.Tensor] = {}

    def networks(self):
        config = self.context.config
        student = self.adapt(build_student(config.model, device="cpu", weights=self.weights("student")))
        fake_score = self.adapt(build_teacher(config.model, device="cpu", weights=self.student_base()))
        self.ema = {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
        return {"student": student, "fake_score": fake_score}

    # The student streams its sample videos as in Diffusion Forcing: periodic ones show the live
    # weights, the final one (after `finish` loads them) the EMA that is exported.
    generate = StudentDiffusionForcing.generate

    def learning_rate(self, name: str) -> float:
        return self.context.config.dmd.fake_score_lr if name == "fake_score" else self.context.trainer.lr

    def step(self, engines, batch, iteration):
        config, dmd = self.context.config, self.context.config.dmd
        encoded = self.encode(batch)
        x0_shape = tuple(encoded.x0.shape)
        generator = torch.Generator().manual_seed(config.seed * 7919 + iteration * 31 + self.context.rank)
        timesteps = list(config.model.student_timesteps)
        exit_index = seeded_choice(config.seed, iteration, len(timesteps))
        update_student = student_updates_at(iteration, dmd.student_every)
        student, fake = engines["student"], engines["fake_score"]
        metrics = {"exit_index": float(exit_index)}

        rollout_generator = torch.Generator(device=encoded.x0.device).manual_seed(config.seed * 7919 + iteration * 31 + self.context.rank)
        with torch.set_grad_enabled(update_student):
            x0_student = rollout(student.module, encoded.cond, x0_shape, timesteps, exit_index, rollout_generator)

        if update_student:
            t = dmd_timesteps(x0_shape[0], dmd.timestep_range, config.model.shift, generator).to(x0_student.device)
            noisy = add_noise(x0_student.detach(), torch.randn(x0_shape, generator=generator).to(x0_student.device), t)
            with torch.no_grad():
                scale = sync_window_scale(t, dmd.guidance_scale, self.window)
                x0_real = self.teacher_x0(noisy, t, encoded, scale)
                x0_fake = x0_from_velocity(noisy, fake.module(noisy, t, encoded.cond), t)
            per_sample = dmd_loss_per_sample(x0_student, x0_real, x0_fake)
            weights = self.reward(x0_student.detach(), encoded.audio) if self.syncnet is not None else None
            loss = weighted_loss(per_sample, weights, dmd.reward_weighting)
            student.backward(loss)
            student.step()
            self.update_ema(student.module, dmd.ema_decay)
            self.counters["updates_student"] += 1
            self.cfg_samples += int((scale > 1).sum())
            self.dmd_samples += len(scale)
            metrics.update({"dmd_loss": loss.item(), "cfg_fraction": float((scale > 1).float().mean())})
            if weights is not None:
                metrics["reward_weight_mean"] = float(weights.mean())

        t = dmd_timesteps(x0_shape[0], dmd.timestep_range, config.model.shift, generator).to(x0_student.device)
        noisy = add_noise(x0_student.detach(), torch.randn(x0_shape, generator=generator).to(x0_student.device), t)
        fake_loss = fake_score_loss(x0_from_velocity(noisy, fake(noisy, t, encoded.cond), t), x0_student)
        fake.backward(fake_loss)
        fake.step()
        self.counters["updates_fake_score"] += 1
        metrics["fake_score_loss"] = fake_loss.item()
        metrics.update({k: float(v) for k, v in self.counters.items()})
        metrics["cfg_fraction_total"] = self.cfg_samples / max(self.dmd_samples, 1)
        return metrics

    def teacher_x0(self, noisy: torch.Tensor, t: torch.Tensor, encoded, scale: torch.Tensor) -> torch.Tensor:
        """The real score's x0: conditional and null branches in one batch, combined per sample."""
        both = Condition.cat([encoded.cond, encoded.cond.null(encoded.negative_text)])
        velocity = self.teacher(torch.cat([noisy, noisy]), torch.cat([t, t]), both)
        conditional, unconditional = velocity.chunk(2)
        guided = cfg_combine(conditional, unconditional, scale)
        return x0_from_velocity(noisy, guided, t)

    @torch.no_grad()
    def reward(self, x0: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """exp(beta * Sync-C) of each TAE-decoded rollout against its audio; no gradient."""
        frames = (self.tae.decode(x0.float()) * 255).round().to(torch.uint8)  # [B, T, 3, H, W]
        confidence = []
        for clip, sound in zip(frames, audio):
            confidence.append(score_clip(self.syncnet, clip.permute(0, 2, 3, 1).cpu(), sound.cpu().numpy().astype(np.float32)).confidence)
        return reward_weights(torch.tensor(confidence), self.context.config.dmd.reward_beta).to(x0.device)

    @torch.no_grad()
    def update_ema(self, module: torch.nn.Module, decay: float) -> None:
        """Every rank keeps the same full EMA of the trainable weights (whole tensors, even under ZeRO-3)."""
        tracked = [(name, param) for name, param in module.named_parameters() if name in self.ema]
        with gathered(param for _, param in tracked):
            for name, param in tracked:
                self.ema[name].mul_(decay).add_(param.detach().to(self.ema[name]), alpha=1 - decay)

    def state(self):
        return {"counters": dict(self.counters), "cfg": [self.cfg_samples, self.dmd_samples], "ema": self.ema}

    def load_state(self, state):
        self.counters.update(state.get("counters", {}))
        self.cfg_samples, self.dmd_samples = state.get("cfg", [0, 0])
        self.ema.update(state.get("ema", {}))

    def finish(self, engines, output_dir):
        """Export the EMA student (merged) as the inference checkpoint; return the DMD counters.

        Training is over (its last checkpoint is saved), so the EMA weights are copied into the live
        module (the gathered full tensors under ZeRO-3) rather than into a copy that would double
        the student's memory.
        """
        student = engines["student"].module
        with torch.no_grad():
            for name, param in student.named_parameters():
                if name in self.ema:
                    param.copy_(self.ema[name])
        self.export(student, output_dir)
        self.render_samples(engines, output_dir, self.name)
        return {**{k: float(v) for k, v in self.counters.items()}, "cfg_fraction_total": self.cfg_samples / max(self.dmd_samples, 1)}
