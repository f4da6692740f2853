"""Stage 3: Self Forcing rollout + Sync-Window DMD + SyncNet reward.

Each micro-batch the student generates the clip chunk by chunk from its own outputs with the
two-step schedule; the exit step (drawn per micro-batch, identical on all ranks) is the only one that
keeps gradients, and each clean chunk is written to the KV cache. The fake score (a bidirectional
copy with its own LoRA) takes an optimizer step every iteration on the detached rollouts; every
`student_every`-th iteration the student also takes one, against the frozen teacher, whose CFG scale
is 4.5 only when the re-noising time lies in the ODE-step 20..40 band (`dmd.window_steps`; the
ablations of `dmd.cfg_mode` apply it everywhere, nowhere or outside the band), weighted per sample by
exp(beta * Sync-C) of the TAE-decoded rollout. The frozen teacher is held in the training precision
and, under ZeRO-3, partitioned across ranks like the trained networks.
"""

from __future__ import annotations

import logging

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
from pipelines.stages.common import DiffusionStage
from pipelines.stages.student import stream_student

log = logging.getLogger("lipforcing.train")


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


def dmd_timesteps(batch: int, dmd, shift: float, generator: torch.Generator) -> torch.Tensor:
    """Re-noising times [batch], by `dmd.timestep_sampling`:

    - `shifted_uniform` (released Lip Forcing): u ~ U[low, high] of `dmd.timestep_bounds`, then shifted;
    - `index_range` (Self Forcing): an index uniform in `dmd.timestep_range` of 1000, then shifted.
    """
    if dmd.timestep_sampling == "index_range":
        low, high = dmd.timestep_range
        u = torch.randint(low, high + 1, (batch,), generator=generator).double() / 1000.0
    else:
        low, high = dmd.timestep_bounds
        u = low + (high - low) * torch.rand(batch, generator=generator, dtype=torch.float64)
    return shift_time(u, shift).float()


def teacher_guidance(t: torch.Tensor, mode: str, scale: float, window: tuple[float, float]) -> torch.Tensor:
    """The teacher's CFG scale per sample [B] for re-noising times t [B], by `dmd.cfg_mode`: window
    (`scale` inside the band, 1 outside), reverse (1 inside, `scale` outside), all (`scale`), none (1)."""
    if mode == "window":
        return sync_window_scale(t, scale, window)
    if mode == "reverse":
        inside = sync_window_scale(t, 2.0, window) == 2.0  # the window's own membership test, ends included
        return torch.where(inside, torch.ones_like(t), torch.full_like(t, scale))
    if mode == "all":
        return torch.full_like(t, scale)
    if mode == "none":
        return torch.ones_like(t)
    raise ValueError(f"config key 'dmd.cfg_mode' is {mode!r}; allowed values: 'window', 'all', 'none', 'reverse'")


class DistributionMatching(DiffusionStage):
    name = "dmd"
    whole_networks = ("student",)  # the fake score is neither exported nor rendered

    def __init__(self, context):
        super().__init__(context)
        config = context.config
        self.tae = build_tae(config.model).to(context.device).eval()  # the reward's, also the previews'
        self.syncnet = load_syncnet(SyncNetConfig(weights=config.dmd.syncnet), key="dmd.syncnet") if config.dmd.syncnet else None
        self.window = sync_window(*config.dmd.window_steps, num_steps=config.model.teacher_steps, shift=config.model.shift)
        self.cfg_samples = self.dmd_samples = 0
        self.ema: dict[str, torch.Tensor] = {}  # empty until the EMA starts (never, with dmd.ema off)

    def networks(self):
        config = self.context.config
        student = self.adapt(build_student(config.model, device="cpu", weights=self.weights("student")))
        fake_score = self.adapt(build_teacher(config.model, device="cpu", weights=self.student_base()))
        return {"student": student, "fake_score": fake_score}

    def frozen_networks(self):
        config = self.context.config
        dtype = torch.bfloat16 if self.context.trainer.precision == "bf16" else torch.float32
        return {"teacher": build_teacher(config.teacher_model, device="cpu", dtype=dtype, weights=self.weights("teacher"))}

    def updates(self, iteration, names):
        if student_updates_at(iteration, self.context.config.dmd.student_every):
            return names
        return tuple(name for name in names if name != "student")

    # Periodic sample videos show the live student; the final one (after `finish`) what is exported.
    def generate(self, engines, cond, negative_text, generator):
        return stream_student(engines["student"].module, cond, generator)

    def learning_rate(self, name: str) -> float:
        return self.context.config.dmd.fake_score_lr if name == "fake_score" else self.context.trainer.lr

    def gradient_clipping(self, name: str) -> float:
        return self.context.config.dmd.fake_score_grad_clip if name == "fake_score" else self.context.trainer.grad_clip

    def step(self, engines, batch, iteration, micro):
        config, dmd = self.context.config, self.context.config.dmd
        encoded = self.encode(batch)
        x0_shape = tuple(encoded.x0.shape)
        generator = self.context.generator(iteration, micro)
        timesteps = list(config.model.student_timesteps)
        exit_index = self.context.shared_choice(iteration, micro, len(timesteps))
        update_student = student_updates_at(iteration, dmd.student_every)
        student, fake = engines["student"], engines["fake_score"]
        metrics = {"exit_index": float(exit_index)}

        rollout_generator = self.context.generator(iteration, micro, encoded.x0.device)
        with torch.set_grad_enabled(update_student):
            x0_student = rollout(student.module, encoded.cond, x0_shape, timesteps, exit_index, rollout_generator)

        if update_student:
            t, noisy = self.renoise(x0_student, generator)
            with torch.no_grad():
                scale = teacher_guidance(t, dmd.cfg_mode, dmd.guidance_scale, self.window)
                x0_real = self.teacher_x0(engines["teacher"], noisy, t, encoded, scale)
                x0_fake = x0_from_velocity(noisy, fake.module(noisy, t, encoded.cond), t)
            per_sample = dmd_loss_per_sample(x0_student, x0_real, x0_fake)
            weights = self.reward(x0_student.detach(), encoded.audio) if self.syncnet is not None else None
            loss = weighted_loss(per_sample, weights, dmd.reward_weighting)
            student.backward(loss)
            self.cfg_samples += int((scale > 1).sum())
            self.dmd_samples += len(scale)
            metrics.update({"dmd_loss": loss.item(), "cfg_fraction": float((scale > 1).float().mean())})
            if weights is not None:
                metrics["reward_weight_mean"] = float(weights.mean())

        t, noisy = self.renoise(x0_student, generator)
        fake_loss = fake_score_loss(x0_from_velocity(noisy, fake(noisy, t, encoded.cond), t), x0_student)
        fake.backward(fake_loss)
        metrics["fake_score_loss"] = fake_loss.item()
        metrics["cfg_fraction_total"] = self.cfg_samples / max(self.dmd_samples, 1)
        return metrics

    def renoise(self, x0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, x_t): the detached sample re-noised at a fresh DMD time, one per sample."""
        config = self.context.config
        t = dmd_timesteps(x0.shape[0], config.dmd, config.model.shift, generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        return t, add_noise(x0.detach(), noise, t)

    def teacher_x0(self, teacher, noisy: torch.Tensor, t: torch.Tensor, encoded, scale: torch.Tensor) -> torch.Tensor:
        """The real score's x0: conditional and null branches in one batch, combined per sample (the
        conditional branch alone when no sample is guided, as with `dmd.cfg_mode=none`)."""
        if bool((scale == 1).all()):
            return x0_from_velocity(noisy, teacher(noisy, t, encoded.cond).to(noisy.dtype), t)
        both = Condition.cat([encoded.cond, encoded.cond.null(encoded.negative_text)])
        velocity = teacher(torch.cat([noisy, noisy]), torch.cat([t, t]), both).to(noisy.dtype)
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
    def end_iteration(self, engines, iteration: int) -> None:
        """The EMA, with `dmd.ema` on: from the first student step at or after iteration
        `dmd.ema_start_step` it starts as a copy of the student, then follows it after every student
        step. Every rank keeps the same whole tensors (gathered under ZeRO-3)."""
        dmd = self.context.config.dmd
        if not dmd.ema or iteration < dmd.ema_start_step or not student_updates_at(iteration, dmd.student_every):
            return
        module = engines["student"].module
        tracked = [(name, param) for name, param in module.named_parameters() if param.requires_grad]
        with gathered(param for _, param in tracked):
            for name, param in tracked:
                live = param.detach().float()
                if name not in self.ema:
                    self.ema[name] = live.clone()
                else:
                    self.ema[name].mul_(dmd.ema_decay).add_(live, alpha=1 - dmd.ema_decay)

    def state(self):
        return {"cfg": [self.cfg_samples, self.dmd_samples], "ema": self.ema}

    def load_state(self, state):
        self.cfg_samples, self.dmd_samples = state.get("cfg", [0, 0])
        self.ema.update(state.get("ema", {}))

    def finish(self, engines, output_dir):
        """Export the student (merged) as the inference checkpoint: the raw weights, as released, or
        the EMA when `dmd.ema` is on and it started.

        Training is over (its last checkpoint is saved), so the EMA weights are copied into the live
        module (the gathered full tensors under ZeRO-3) rather than into a copy that would double
        the student's memory.
        """
        dmd = self.context.config.dmd
        student = engines["student"].module
        if dmd.ema and not self.ema:
            log.warning("[dmd] dmd.ema is on but no student step came at or after dmd.ema_start_step=%d: "
                        "exporting the raw student", dmd.ema_start_step)  # fmt: skip
        with torch.no_grad():
            for name, param in student.named_parameters():
                if name in self.ema:
                    param.copy_(self.ema[name].to(param.dtype))
        self.export(student, output_dir)
        self.render_samples(engines, output_dir, self.name)
        return {"cfg_fraction_total": self.cfg_samples / max(self.dmd_samples, 1), "exported_ema": float(bool(self.ema))}
