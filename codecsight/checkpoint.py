"""Model checkpoints: the one place that knows the model geometry, plus the tiny default model.

A checkpoint is a local directory in the Hugging Face layout (config.json, weights,
tokenizer, preprocessor_config.json) of a Qwen2-VL-architecture model. The same loading code
serves the project's tiny model and a real Qwen2-VL checkpoint; nothing is fetched from a hub.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

# Qwen2-VL normalises pixels with the OpenAI CLIP statistics; real checkpoints say so in
# preprocessor_config.json, which wins when present.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

SPECIAL_TOKENS = [
    "<|pad|>", "<|unk|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]

# Words of the analytics questions and answers the tiny model deals with. Lower-cased;
# punctuation is split off by the pre-tokenizer.
DOMAIN_WORDS = """
yes no none zero one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9
is are was were did does do there any anyone anything someone something a an the this that
in on at of to from into out across against with without and or not how many much what
which where who when window frame frames clip camera scene zone left right top bottom
center middle upper lower loading bay door road lane entrance exit area region
object objects person people car cars truck trucks bicycle dog ball box vehicle vehicles
red green blue yellow white black orange purple grey gray
moving move moves moved stopped still static paused running walking fast slow
enter entered enters leave left passed pass count number anomaly anomalous unusual flow
direction wrong way kind kinds colour color user assistant system
? . , : ; ' -
""".split()

TINY_SEED = 0


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Vision geometry of a checkpoint: patch sizes, merge size and pixel normalisation."""

    patch_size: int            # pixels per patch side (14 for Qwen2-VL)
    temporal_patch_size: int   # frames per patch (2: previous sampled frame, then this one)
    merge_size: int            # patches per merge-group side (2: 2x2 patches -> 1 token)
    in_channels: int
    vision_hidden: int         # width of a merged visual token (= LLM hidden size)
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    min_pixels: int | None = None  # preprocessor_config.json's, where given: the smallest
                                   # picture Qwen's smart_resize scales to (codec.picture_for)
    frame_layout: str = "overlapping"  # how sampled frames fill a temporal patch
                                       # (families.base.FRAME_LAYOUTS)

    @property
    def group_pixels(self) -> int:
        """Side of one merge group in pixels (28 for Qwen2-VL)."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: C * T * P * P (1176 for Qwen2-VL)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def patches_per_group(self) -> int:
        return self.merge_size ** 2

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> "Geometry":
        """Read the geometry from a checkpoint directory without importing torch: its
        family's (codecsight.families), so any supported family's config is read right.
        FileNotFoundError without config.json; families.UnsupportedFamily."""
        from codecsight.families import family_for_dir

        return family_for_dir(model_dir).geometry


def tiny_config(vocab_size: int, token_ids: dict[str, int]):
    """Config of the tiny Qwen2-VL-architecture model (same classes as the real one)."""
    from transformers import Qwen2VLConfig

    head_dim = 32
    text = dict(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 20.0,
                         "mrope_section": [4, 6, 6]},  # sums to head_dim / 2
        bos_token_id=token_ids["<|im_start|>"], eos_token_id=token_ids["<|endoftext|>"],
        pad_token_id=token_ids["<|pad|>"],
    )
    assert sum(text["rope_parameters"]["mrope_section"]) == head_dim // 2
    vision = dict(depth=2, embed_dim=64, hidden_size=128, num_heads=4, mlp_ratio=2,
                  patch_size=14, temporal_patch_size=2, spatial_merge_size=2, in_channels=3)
    return Qwen2VLConfig(
        text_config=text, vision_config=vision,
        image_token_id=token_ids["<|image_pad|>"], video_token_id=token_ids["<|video_pad|>"],
        vision_start_token_id=token_ids["<|vision_start|>"],
        vision_end_token_id=token_ids["<|vision_end|>"], tie_word_embeddings=False,
    )


def tiny_tokenizer():
    """A word-level tokenizer over the analytics vocabulary (a real tokenizers.Tokenizer)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(dict.fromkeys(SPECIAL_TOKENS + DOMAIN_WORDS))
    words += [f"<|reserved_{i}|>" for i in range((-len(words)) % 64)]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<|unk|>", pad_token="<|pad|>",
        eos_token="<|endoftext|>", bos_token="<|im_start|>",
    )


def build_tiny(out_dir: str | Path, seed: int = TINY_SEED) -> Path:
    """Write the tiny model (random weights, seeded) with tokenizer and preprocessor config."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    out_dir = Path(out_dir)
    tokenizer = tiny_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = tiny_config(len(tokenizer), ids)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    geometry = config.vision_config
    (out_dir / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor",
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
        "patch_size": geometry.patch_size, "temporal_patch_size": geometry.temporal_patch_size,
        "merge_size": geometry.spatial_merge_size,
    }, indent=2))
    (out_dir / "CODECSIGHT.md").write_text(
        f"Tiny Qwen2-VL-architecture model with RANDOM weights (seed {seed}), built by "
        "`codecsight build`. Its answers carry no meaning; it exercises the real code path.\n")
    return out_dir


def build_tiny_family(out_dir: str | Path, family: str = "qwen2_vl", seed: int = TINY_SEED,
                      ours: bool = False) -> Path:
    """Write a tiny random checkpoint of any registered family (its own config classes,
    preprocessor config and the analytics tokenizer), as a real checkpoint of that family
    would be laid out: without CodecSight's marker, so it is served with the processor's
    non-overlapping temporal pairs and previous-maximum text positions (ours=True writes the
    marker: overlapping pairs and transformers 5 text positions, as the demo model).
    family: a registry name (families.FAMILIES' `name`). Returns out_dir."""
    import torch

    from codecsight.families import FAMILIES
    from codecsight.families.base import CODECSIGHT_MARKER

    by_name = {f.name: f for f in FAMILIES}
    if family not in by_name:
        raise ValueError(f"unknown family {family!r}; registered: {sorted(by_name)}")
    cls = by_name[family]
    out_dir = Path(out_dir)
    tokenizer = cls.tiny_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = cls.tiny_config(len(tokenizer), ids)
    torch.manual_seed(seed)
    model = cls(config.to_dict()).model_class()(config).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "preprocessor_config.json").write_text(
        json.dumps(cls.tiny_preprocessor(config), indent=2))
    if ours:
        (out_dir / CODECSIGHT_MARKER).write_text(
            f"Tiny {cls.title} model with RANDOM weights (seed {seed}), laid out as "
            "CodecSight's own checkpoints.\n")
    return out_dir


def load(model_dir: str | Path):
    """Load (model, tokenizer) from a local checkpoint directory of any supported family,
    offline, in float32 on CPU."""
    from codecsight.families import family_for_dir

    return family_for_dir(model_dir).load(model_dir)
