"""What the server tests send: the bundled clip, stream settings for it, unique stream IDs.

Every server test shares one tritonserver, so each stream gets an ID no other test uses.
"""
from __future__ import annotations

import functools
import uuid

import numpy as np

from codecsight.serve import REPO_ROOT
from codecsight_client.demux import probe
from codecsight_client.stream import StreamSettings

CLIP = str(REPO_ROOT / "media" / "car-detection.mp4")
# FFmpeg's AVMotionVector fields for hand-made records, packed (PyAV's own dtype is aligned:
# 40 bytes, not 32), so code under test must read the layout from the dtype it is given
MOTION_VECTOR_DTYPE = np.dtype({
    "names": ["source", "w", "h", "src_x", "src_y", "dst_x", "dst_y", "flags", "motion_x",
              "motion_y", "motion_scale"],
    "formats": ["<i4", "u1", "u1", "<i2", "<i2", "<i2", "<i2", "<u8", "<i4", "<i4", "<u2"]})


@functools.lru_cache(maxsize=None)
def _probed(path: str):
    return probe(path)


def clip_settings(path: str = CLIP, **overrides) -> StreamSettings:
    """StreamSettings for a clip (its codec and rate), 1 fps, 4 s windows; overrides win."""
    info = _probed(str(path))
    values = dict(question="is anyone moving?", codec=info.codec, source_fps=info.fps,
                  analysis_fps=1.0, window_seconds=4.0)
    return StreamSettings(**{**values, **overrides})


def decoded_clip(path: str = CLIP, chunk_seconds: float = 4.0) -> list:
    """Every frame of a clip as codec_parser decodes it: the client's chunks fed to one
    StreamDecoder (DecodedFrame list, display order)."""
    from codecsight.codec import StreamDecoder
    from codecsight_client.demux import iter_chunks

    decoder = StreamDecoder()
    frames = []
    for c in iter_chunks(str(path), chunk_seconds):
        frames += decoder.feed(c.data, au_bytes=list(c.au_sizes), au_pts=list(c.au_pts))
    return frames + decoder.flush()


def new_id(name: str) -> str:
    """A stream ID no other test uses: name plus a random suffix."""
    return f"{name}-{uuid.uuid4().hex[:8]}"
