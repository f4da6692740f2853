"""Audio encoder + Audio Pack, text embeddings, LoRA, the Wan VAE wrapper and the condition."""

import pytest
import torch

from lipforcing.models import (
    build_audio_encoder,
    build_teacher,
    build_vae,
    mask_to_latent,
    model_config,
    pack_audio,
    random_condition,
    text_embeddings,
)
from lipforcing.models.lora import (
    adapted_parameter_count,
    apply_lora,
    export_state_dict,
    lora_layers,
    merge_lora,
    remove_lora,
    trainable_state_dict,
    unmerge_lora,
)
from lipforcing.models.text import load_text_embedding, save_text_embedding

torch.set_num_threads(1)  # tiny tensors: one thread avoids OpenMP oversubscription on 2 shared cores


def test_audio_features_per_video_frame_and_pack() -> None:
    cfg = model_config("tiny")
    encoder = build_audio_encoder(cfg)
    wave = torch.randn(2, 16000 * 81 // 25)  # 3.24 s at 16 kHz
    with torch.no_grad():
        feats = encoder(wave, num_frames=81)
    assert feats.shape == (2, 81, cfg.audio_feature_dim) == (2, 81, 4 * 32)
    packed = pack_audio(feats)
    assert packed.shape == (2, 21, 4 * cfg.audio_feature_dim)
    assert torch.equal(packed[:, 0], feats[:, 0].repeat(1, 4))  # first frame repeated: 81 -> 84 -> 21
    assert torch.equal(packed[:, 1], feats[:, 1:5].flatten(1))
    with pytest.raises(ValueError):
        pack_audio(feats[:, :80])
    assert model_config("1.3b").audio_feature_dim == 10752
    with pytest.raises(FileNotFoundError, match="no_wav2vec"):
        build_audio_encoder(cfg, "/no_wav2vec")


def test_text_embeddings(tmp_path) -> None:
    cfg = model_config("tiny")
    pos, neg = text_embeddings(cfg)
    assert pos.shape == neg.shape == (cfg.text_len, cfg.text_dim) and not torch.equal(pos, neg)
    assert torch.equal(text_embeddings(cfg)[0], pos)  # fixed: the same tensor every time
    save_text_embedding(torch.randn(5, cfg.text_dim), str(tmp_path / "prompt.safetensors"))
    loaded = load_text_embedding(str(tmp_path / "prompt.safetensors"), cfg.text_len)
    assert loaded.shape == (cfg.text_len, cfg.text_dim) and not loaded[5:].any() and loaded[:5].any()
    cached = model_config("tiny", text_embedding=str(tmp_path / "prompt.safetensors"))
    assert torch.equal(text_embeddings(cached)[0], loaded) and not text_embeddings(cached)[1].any()
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        load_text_embedding(str(tmp_path / "absent.safetensors"), 16)


def test_lora_inject_merge_export() -> None:
    model = build_teacher("tiny").eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    cond = random_condition(model.cfg, 1, 3, 4, 4, torch.Generator().manual_seed(0))
    x, t = torch.randn(1, 16, 3, 4, 4), torch.tensor([0.6])
    with torch.no_grad():
        before = model(x, t, cond)
        apply_lora(model, rank=4, alpha=2)
        torch.testing.assert_close(model(x, t, cond), before)  # fresh adapters change nothing
        assert len(lora_layers(model)) == 10 * model.cfg.num_layers  # q,k,v,o x 2 attentions + ffn.0, ffn.2
        trainable = trainable_state_dict(model)
        assert all(
            "lora_" in k or k.split(".")[0] in ("patch_embedding", "audio_proj", "audio_cond_projs")
            for k in trainable
        )
        assert not any("norm_q" in k or "modulation" in k for k in trainable)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
        adapted = model(x, t, cond)
        assert not torch.allclose(adapted, before)
        merge_lora(model)
        torch.testing.assert_close(model(x, t, cond), adapted, rtol=1e-4, atol=1e-4)
        unmerge_lora(model)
        exported = export_state_dict(model)
        assert set(exported) == set(original)
        torch.testing.assert_close(model(x, t, cond), adapted)  # export leaves the adapters unmerged
        remove_lora(model)
        assert set(model.state_dict()) == set(original) and not lora_layers(model)
        torch.testing.assert_close(model(x, t, cond), adapted, rtol=1e-4, atol=1e-4)
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, exported[k])


def test_adapted_parameter_count_matches_what_apply_lora_trains() -> None:
    """The memory report counts trainable parameters of 1.3B / 14B models on the meta device with
    `adapted_parameter_count`; it must be what `apply_lora` really trains."""
    cfg = model_config("tiny", use_reference_sequence=True)
    counted = adapted_parameter_count(build_teacher(cfg, device="meta"), 4, cfg.lora_targets)
    model = apply_lora(build_teacher(cfg), rank=4, alpha=2)
    assert counted == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_wan_vae_wrapper_and_streaming_decode() -> None:
    vae = build_vae(model_config("tiny"))
    video = torch.rand(1, 9, 3, 16, 16)
    mask = torch.ones(1, 1, 1, 16, 16)
    mask[..., 8:, :] = 0
    with torch.no_grad():
        latents = vae.encode(video)
        masked = vae.encode_masked(video, mask)
        whole = vae.decode(latents)
        stream = vae.stream_decoder()
        parts = [stream.decode(latents[:, :, :1]), stream.decode(latents[:, :, 1:])]
    assert latents.shape == (1, 16, 3, 2, 2) and not torch.equal(latents, masked)
    assert whole.shape == (1, 9, 3, 16, 16) and 0 <= whole.min() and whole.max() <= 1
    assert [p.shape[1] for p in parts] == [1, 8]
    torch.testing.assert_close(torch.cat(parts, dim=1), whole)
    cfg = vae.vae.config  # the per-channel normalisation comes from the VAE's own config
    assert torch.equal(vae.mean.flatten(), torch.tensor(cfg.latents_mean))
    with pytest.raises(FileNotFoundError, match="no_vae_here"):
        build_vae(model_config("tiny"), "/no_vae_here")


def test_the_vae_streams_encode_chunk_by_chunk_as_whole_and_interleave_with_decoding() -> None:
    """Streaming inference encodes 9 frames, then 12 at a time (the student's chunks), decoding in
    between: the latents and frames must equal the whole clip's, caches kept apart."""
    vae = build_vae(model_config("tiny"))
    torch.manual_seed(3)
    video = torch.rand(1, 37, 3, 16, 16)  # 9 + 12 + 12 + 4: a short last chunk too
    mask = torch.ones(1, 1, 1, 16, 16)
    mask[..., 8:, :] = 0
    with torch.no_grad():
        whole, whole_masked = vae.encode(video), vae.encode_masked(video, mask)
        decoded = vae.decode(whole)
        encoder, masked_encoder, decoder = vae.stream_encoder(), vae.stream_encoder(), vae.stream_decoder()
        latents, masked, frames = [], [], []
        for start, stop in [(0, 9), (9, 21), (21, 33), (33, 37)]:
            latents.append(encoder.encode(video[:, start:stop]))
            masked.append(masked_encoder.encode_masked(video[:, start:stop], mask))
            frames.append(decoder.decode(latents[-1]))
        with pytest.raises(ValueError, match="1 \\+ 4k frames first, then 4k; got 3"):
            encoder.encode(video[:, :3])
    assert [chunk.shape[2] for chunk in latents] == [3, 3, 3, 1]
    torch.testing.assert_close(torch.cat(latents, dim=2), whole, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat(masked, dim=2), whole_masked, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat(frames, dim=1), decoded, rtol=1e-4, atol=1e-5)


def test_mask_to_latent_keeps_only_fully_kept_cells() -> None:
    mask = torch.ones(1, 1, 32, 32)
    mask[..., 20:, :] = 0  # the boundary row 20 falls inside latent row 2 (pixels 16..23)
    latent = mask_to_latent(mask)
    assert latent.shape == (1, 1, 1, 4, 4)
    assert latent[0, 0, 0, :, 0].tolist() == [1.0, 1.0, 0.0, 0.0]


def test_condition_slicing_and_batching() -> None:
    cfg = model_config("tiny", use_reference_sequence=True)
    cond = random_condition(cfg, 2, 6, 4, 4)
    assert cond.channels(6).shape == (2, 16 + 1 + 16 + 16, 6, 4, 4)  # + the noisy latent = 65
    part = cond.frames(3, 6)
    assert part.audio.shape[1] == 3 and part.reference.shape[2] == 1 and part.reference_sequence.shape[2] == 3
    assert torch.equal(part.masked_video, cond.masked_video[:, :, 3:6])
    both = type(cond).cat([cond, cond.null(torch.zeros(cfg.text_len, cfg.text_dim))])
    assert both.audio.shape[0] == 4 and not both.audio[2:].any()
    model = build_teacher(cfg).eval()
    assert model.patch_embedding.in_channels == 65
    with torch.no_grad():
        assert model(torch.randn(2, 16, 6, 4, 4), torch.tensor([0.5, 0.5]), cond).shape == (2, 16, 6, 4, 4)


def test_encode_prompt_with_a_local_umt5(tmp_path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    from lipforcing.models.text import encode_prompt

    vocab = {"<pad>": 0, "<unk>": 1, "a": 2, "person": 3, "talking": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>").save_pretrained(
        tmp_path / "tokenizer"
    )
    torch.manual_seed(0)
    config = UMT5Config(vocab_size=8, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    UMT5EncoderModel(config).save_pretrained(tmp_path / "text_encoder")
    embedding = encode_prompt("a person talking", str(tmp_path / "text_encoder"))
    assert embedding.shape == (3, 16) and torch.isfinite(embedding).all()
    with pytest.raises(FileNotFoundError, match="no_encoder"):
        encode_prompt("a person talking", str(tmp_path / "no_encoder"))


def test_vae_and_audio_encoder_load_from_local_folders(tmp_path) -> None:
    """The real-weights path: diffusers / transformers folders read offline, outputs identical."""
    cfg = model_config("tiny")
    vae = build_vae(cfg)
    vae.vae.save_pretrained(tmp_path / "vae")
    encoder = build_audio_encoder(cfg)
    encoder.wav2vec.save_pretrained(tmp_path / "wav2vec2")
    loaded_vae = build_vae(model_config("tiny", vae_weights=str(tmp_path / "vae")))
    loaded_encoder = build_audio_encoder(cfg, str(tmp_path / "wav2vec2"))
    z, wave = torch.randn(1, 16, 2, 2, 2), torch.randn(1, 16000)
    with torch.no_grad():
        torch.testing.assert_close(loaded_vae.decode(z), vae.decode(z))
        torch.testing.assert_close(loaded_encoder(wave, 25), encoder(wave, 25))


def test_the_dit_mask_channel_is_one_where_the_mouth_is_generated() -> None:
    """Through the real encode path (window mask -> latent mask -> Condition -> patch embedding input):
    the DiT's mask channel is 1 - keep_mask (OmniAvatar), 1 on the mouth cells and 0 elsewhere.
    Feeding the keep-mask would tell released weights to regenerate everything but the mouth."""
    from lipforcing.data.encode import LatentEncoder
    from lipforcing.data.windows import WindowConfig

    cfg = model_config("tiny")
    window = WindowConfig(frames=9, size=64, mask_box=[0.55, 0.95, 0.2, 0.8])
    encoder = LatentEncoder(cfg, window)
    generator = torch.Generator().manual_seed(0)
    video = torch.rand(1, 9, 3, 64, 64, generator=generator)
    cond = encoder.condition({"video": video, "reference": video[:, :1], "audio": torch.randn(1, 9 * 640, generator=generator)})

    # mouth box in pixels: rows [35, 61), cols [13, 51); a latent cell (8x8 pixels) is generated when it
    # holds any mouth pixel: latent rows 4..7, cols 1..6
    expected = torch.zeros(8, 8)
    expected[4:8, 1:7] = 1
    assert torch.equal(cond.mask[0, 0, 0], 1 - expected)  # stored as LatentSync's keep-mask
    assert torch.equal(cond.channels(3)[0, 16], expected.expand(3, 8, 8))  # after the 16 reference channels

    seen = {}
    model = build_teacher(cfg).eval()
    model.patch_embedding.register_forward_pre_hook(lambda module, args: seen.update(x=args[0]))
    with torch.no_grad():
        model(torch.zeros(1, 16, 3, 8, 8), torch.full((1,), 0.5), cond)
    assert torch.equal(seen["x"][0, 32], expected.expand(3, 8, 8))  # noisy (16) + reference (16), then the mask


def test_a_missing_negative_text_embedding_is_warned_about(tmp_path, caplog) -> None:
    """Real profiles read the cached text embedding by path; without the negative one, CFG's null
    branch falls back to zeros (not what the released teacher was trained with), loudly."""
    cfg = model_config("tiny")
    save_text_embedding(torch.randn(3, cfg.text_dim), str(tmp_path / "text.safetensors"))
    save_text_embedding(torch.randn(1, cfg.text_dim), str(tmp_path / "negative.safetensors"))
    cfg.text_embedding = str(tmp_path / "text.safetensors")
    with caplog.at_level("WARNING", logger="lipforcing"):
        _, negative = text_embeddings(cfg)
    assert not negative.any() and "model.negative_text_embedding is empty" in caplog.text
    caplog.clear()
    cfg.negative_text_embedding = str(tmp_path / "negative.safetensors")
    with caplog.at_level("WARNING", logger="lipforcing"):
        _, negative = text_embeddings(cfg)
    assert negative[0].abs().sum() > 0 and not negative[1:].any() and not caplog.text  # padded to text_len
