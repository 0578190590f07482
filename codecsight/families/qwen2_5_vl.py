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
