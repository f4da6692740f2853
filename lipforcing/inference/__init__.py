"""Streaming inference with the causal student."""

from lipforcing.inference.streaming import (
    StreamChunk,
    StreamDecoder,
    denoise_chunk,
    split_chunks,
    stream_generate,
)

__all__ = ["StreamChunk", "StreamDecoder", "denoise_chunk", "split_chunks", "stream_generate"]
