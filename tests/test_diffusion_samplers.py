"""Teacher ODE sampler with CFG, and the student's two-step streaming sampler."""

import pytest
import torch

from lipforcing.diffusion import sample_teacher
from lipforcing.inference import denoise_chunk, stream_generate
from lipforcing.models import (
    build_student,
    build_tae,
    build_teacher,
    build_vae,
    random_condition,
    text_embeddings,
)

torch.set_num_threads(1)  # tiny tensors: one thread avoids OpenMP oversubscription on 2 shared cores


@pytest.fixture(scope="module")
def teacher_inputs():
    teacher = build_teacher("tiny").eval()
    with torch.no_grad():
        for p in teacher.audio_cond_projs.parameters():
            p.normal_(std=0.1)
    g = torch.Generator().manual_seed(0)
    cond = random_condition(teacher.cfg, 1, 3, 4, 4, g)
    _, negative = text_embeddings(teacher.cfg)
    return teacher, torch.randn(1, 16, 3, 4, 4, generator=g), cond, cond.null(negative)


def test_teacher_cfg_one_equals_no_cfg(teacher_inputs) -> None:
    teacher, noise, cond, null = teacher_inputs
    plain = sample_teacher(teacher, noise, cond, save_trajectory=True)
    guided_one = sample_teacher(teacher, noise, cond, null, guidance_scale=1.0)
    assert plain.x0_trajectory.shape == (50, *noise.shape)
    torch.testing.assert_close(plain.x0_trajectory[-1], plain.latents)  # the last x0 prediction is the sample
    torch.testing.assert_close(guided_one.latents, plain.latents, rtol=1e-4, atol=1e-4)
    guided = sample_teacher(teacher, noise, cond, null, guidance_scale=4.5)
    assert (guided.latents - plain.latents).abs().max() > 1e-2


def test_null_condition_drops_audio_and_text_only(teacher_inputs) -> None:
    _, _, cond, null = teacher_inputs
    assert not null.audio.any() and not torch.equal(null.text, cond.text)
    assert (
        null.masked_video is cond.masked_video and null.mask is cond.mask and null.reference is cond.reference
    )


def test_student_two_step_stream_frame_counts() -> None:
    student = build_student("tiny").eval()
    tae = build_tae("tiny")
    cond = random_condition(student.cfg, 1, 9, 4, 4, torch.Generator().manual_seed(0))
    chunks = list(stream_generate(student, cond, decoder=tae.stream_decoder(), generator=torch.Generator()))
    assert [c.frames.shape[1] for c in chunks] == [9, 12, 12]
    assert all(c.latents.shape == (1, 16, 3, 4, 4) for c in chunks)
    with torch.no_grad():  # the streamed pixels equal a whole-clip decode of the streamed latents
        whole = tae.decode(torch.cat([c.latents for c in chunks], dim=2))
    torch.testing.assert_close(torch.cat([c.frames for c in chunks], dim=1), whole)


def test_student_sampler_uses_the_two_step_schedule() -> None:
    student = build_student("tiny").eval()
    seen = []
    original = student.forward_chunk

    def spy(x, t, cond, cache, write=False):
        seen.append((round(t[0].item(), 3), write))
        return original(x, t, cond, cache, write)

    student.forward_chunk = spy
    cond = random_condition(student.cfg, 1, 6, 4, 4)
    list(stream_generate(student, cond))
    assert seen == [(0.999, False), (0.769, False), (0.0, True)] * 2
    cache = student.new_cache()
    noise = torch.randn(1, 16, 3, 4, 4)
    one = denoise_chunk(student, noise, cond.frames(0, 3), cache, generator=torch.Generator().manual_seed(1))
    two = denoise_chunk(student, noise, cond.frames(0, 3), cache, generator=torch.Generator().manual_seed(1))
    assert torch.equal(one, two) and cache.num_frames == 0


def test_student_stream_with_the_wan_vae_decoder() -> None:
    student = build_student("tiny").eval()
    vae = build_vae(student.cfg)
    cond = random_condition(student.cfg, 1, 6, 2, 2)
    chunks = list(stream_generate(student, cond, decoder=vae.stream_decoder()))
    assert [tuple(c.frames.shape) for c in chunks] == [(1, 9, 3, 16, 16), (1, 12, 3, 16, 16)]
    assert all(0 <= c.frames.min() and c.frames.max() <= 1 for c in chunks)


def test_self_forcing_exit_step_runs_with_gradient_only_at_the_exit() -> None:
    student = build_student("tiny")
    cond = random_condition(student.cfg, 1, 3, 4, 4, torch.Generator().manual_seed(0))
    cache = student.new_cache()
    noise = torch.randn(1, 16, 3, 4, 4)
    with torch.no_grad():
        reference = denoise_chunk(student, noise, cond, cache, generator=torch.Generator().manual_seed(3))
        first = denoise_chunk(student, noise, cond, cache, exit_step=0)
    x0 = denoise_chunk(student, noise, cond, cache, generator=torch.Generator().manual_seed(3), grad=True)
    assert x0.requires_grad and not first.requires_grad
    torch.testing.assert_close(x0.detach(), reference)
    x0.square().mean().backward()
    assert student.blocks[0].self_attn.q.weight.grad.abs().sum() > 0
    assert not torch.equal(first, reference)
