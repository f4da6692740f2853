"""The causal student: block-causal masks, streaming == full sequence, bounded cache."""

import torch

from lipforcing.models import block_causal_mask, build_student, build_teacher, model_config, random_condition

torch.set_num_threads(1)  # tiny tensors: one thread avoids OpenMP oversubscription on 2 shared cores


def rollout(student, x, t, cond, cache) -> torch.Tensor:
    """Stream x chunk by chunk (writing every chunk to the cache), concatenating the outputs."""
    chunk = student.cfg.chunk_frames
    outs = []
    with torch.no_grad():
        for start in range(0, x.shape[2], chunk):
            s = slice(start, start + chunk)
            outs.append(
                student.forward_chunk(x[:, :, s], t[:, s], cond.frames(start, s.stop), cache, write=True)
            )
    return torch.cat(outs, dim=2)


def setup(frames: int, **overrides):
    cfg = model_config("tiny", **overrides)
    g = torch.Generator().manual_seed(0)
    student = build_student(cfg).eval()
    cond = random_condition(cfg, 2, frames, 4, 4, g)
    return student, torch.randn(2, 16, frames, 4, 4, generator=g), torch.rand(2, frames, generator=g), cond


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_block_causal_mask() -> None:
    mask = block_causal_mask(9, 1, 3)
    assert mask[0, :3].all() and not mask[0, 3:].any()  # frame 0 sees its whole chunk, nothing later
    assert mask[5, :6].all() and not mask[5, 6:].any()
    windowed = block_causal_mask(9, 2, 3, window_frames=4, sink_frames=1)  # 2 tokens per frame
    frame_row = windowed[2 * 7, ::2]  # a query of frame 7 (chunk 2) over key frames 0..8
    assert frame_row.tolist() == [True, False, False, False, False, False, True, True, True]


def test_streaming_matches_block_causal_forward_within_window() -> None:
    # 2 chunks fit the default 7-frame window (1 sink + 6 rolling)
    student, x, t, cond = setup(6)
    with torch.no_grad():
        full = student(x, t, cond, window_frames=7, sink_frames=1)
    assert rel_err(rollout(student, x, t, cond, student.new_cache()), full) < 1e-4
    # 3 chunks fit a 1 + 8 window
    student, x, t, cond = setup(9)
    with torch.no_grad():
        full = student(x, t, cond)
    assert rel_err(rollout(student, x, t, cond, student.new_cache(1, 8)), full) < 1e-4
    # and block-causal really is causal: the first chunk ignores later frames, the teacher does not
    x2 = x.clone()
    x2[:, :, 6:] += 1
    with torch.no_grad():
        torch.testing.assert_close(student(x2, t, cond)[:, :, :3], full[:, :, :3])
        teacher = build_teacher(student.cfg).eval()
        assert not torch.allclose(teacher(x2, t, cond)[:, :, :3], teacher(x, t, cond)[:, :, :3])


def test_absolute_rope_streaming_matches_windowed_forward_beyond_window() -> None:
    student, x, t, cond = setup(15, dynamic_rope=False)
    with torch.no_grad():
        full = student(x, t, cond, window_frames=7, sink_frames=1)
    assert rel_err(rollout(student, x, t, cond, student.new_cache()), full) < 1e-4


def test_long_rollout_keeps_a_bounded_cache_with_dynamic_rope() -> None:
    student, x, t, cond = setup(3)
    cache = student.new_cache()
    sizes = []
    with torch.no_grad():
        for _ in range(8):  # 24 latent frames, well past the 7-frame window
            student.cache_clean_chunk(x, cond, cache)
            assert cache.num_frames <= 7
            sizes.append(cache.nbytes())
        v = student.forward_chunk(x, t, cond, cache)
    assert cache.frames == [0, 18, 19, 20, 21, 22, 23]  # the sink plus the 6 most recent frames
    assert sizes[2:] == [sizes[2]] * 6  # constant once full
    assert cache.next_frame == 24 and torch.isfinite(v).all()
    # a non-writing call leaves the cache alone
    assert cache.frames == [0, 18, 19, 20, 21, 22, 23] and cache.nbytes() == sizes[-1]


def test_dynamic_rope_keeps_positions_window_local() -> None:
    """Streaming the same chunk forever: with dynamic RoPE the steady state repeats exactly (positions
    never grow); with absolute positions it keeps drifting."""
    for dynamic in (True, False):
        student, x, t, cond = setup(3, dynamic_rope=dynamic)
        cache = student.new_cache()
        outs = []
        with torch.no_grad():
            for _ in range(6):
                outs.append(student.forward_chunk(x, t, cond, cache))
                student.cache_clean_chunk(x, cond, cache)
        same = torch.allclose(outs[4], outs[5], atol=1e-5)
        assert same == dynamic
