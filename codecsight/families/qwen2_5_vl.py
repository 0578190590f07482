"""Qwen2.5-VL: Qwen2-VL's prompt and sectioned M-RoPE, with temporal ids that follow time
(tokens_per_second per second of video) and a ViT whose blocks attend inside windows of
window_size pixels except the full-attention blocks (fullatt_block_indexes), which attend
inside each frame."""
from __future__ import annotations

from codecsight.families.qwen2_vl import Qwen2VL


class Qwen2_5VL(Qwen2VL):
    name = "qwen2_5_vl"
    title = "Qwen2.5-VL"
    model_types = ("qwen2_5_vl",)

    def merged_width(self) -> int:
        return int(self.vision_config.get("out_hidden_size", self.text_config["hidden_size"]))

    def model_class(self):
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration

    @classmethod
    def tiny_config(cls, vocab_size: int, token_ids: dict[str, int]):
        """2 text layers of width 128 (head_dim 32 = 2 * sum(mrope_section)); a 2-block ViT
        of width 64 whose block 0 attends in 112-pixel windows (8x8 patches) and block 1
        over the whole frame; 2 temporal ids per second."""
        from transformers import Qwen2_5_VLConfig

        text = dict(
            vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
            rope_parameters={"rope_type": "default", "rope_theta": 1000.0,
                             "mrope_section": [4, 6, 6]},
            bos_token_id=token_ids["<|im_start|>"], eos_token_id=token_ids["<|endoftext|>"],
            pad_token_id=token_ids["<|pad|>"])
        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4,
                      out_hidden_size=128, patch_size=14, temporal_patch_size=2,
                      spatial_merge_size=2, in_channels=3, window_size=112,
                      fullatt_block_indexes=[1], tokens_per_second=2)
        return Qwen2_5_VLConfig(
            text_config=text, vision_config=vision,
            image_token_id=token_ids["<|image_pad|>"], video_token_id=token_ids["<|video_pad|>"],
            vision_start_token_id=token_ids["<|vision_start|>"],
            vision_end_token_id=token_ids["<|vision_end|>"], tie_word_embeddings=False)

    @property
    def window_patches(self) -> int:
        """Side of one attention window in patches: the stock tower's window in merged cells
        (window_size // merge // patch) times the merge size."""
        vision, g = self.vision_config, self.geometry
        return int(vision.get("window_size", 112)) // g.merge_size // g.patch_size \
            * g.merge_size

    def vision_tower(self, model):
        from codecsight.vision import PrunedVisionEncoder

        visual = model.model.visual
        return PrunedVisionEncoder(visual, window_patches=self.window_patches,
                                   full_blocks=tuple(visual.fullatt_block_indexes)).eval()

    def temporal_id(self, t_rel: int, seconds_per_t: float) -> int:
        """int(t_rel * tokens_per_second * seconds per temporal patch), in float32 as
        get_rope_index computes it (second_per_grid_ts arrives as a float32 tensor)."""
        import torch

        tokens_per_second = int(self.vision_config.get("tokens_per_second", 4))
        interval = tokens_per_second * torch.tensor(seconds_per_t, dtype=torch.float32)
        return int((torch.tensor(t_rel) * interval).long())
