"""Micro-Batch Streaming (MBS) training of the demo model on generated surveillance clips.

Training runs the serving path, so that trained weights mean the same thing when served:
each clip is encoded with libx264, cut into chunks and windowed exactly as a stream is
(`synth.serving_windows`: demux.iter_chunks -> codec.StreamDecoder -> codec.FrameSampler ->
llm.SlidingWindow, pixels from codec.frame_to_rgb); a window's kept merge groups are
patchified with `vision.patchify`, encoded by `vision.PrunedVisionEncoder` (the module exported to ONNX for
vit_pruned) and laid out by `llm.VisualLM.layout` (prompt, M-RoPE positions).

Two stages, because the answer loss alone did not train a model from random weights in the
time budget (measured: 800 steps stayed at the answer prior; a random ViT gives the LLM
nothing to attend to and the LLM gives the ViT too faint a signal):
1. the ViT learns what each merge group shows (object kind, anomalous look: with the
   previous sampled frame in each patch's first temporal slot it sees motion too) from the
   clips' ground truth, through a training-only linear head that is not saved
   (`pretrain_vision`);
2. the LLM learns the answers, cross-entropy on the answer tokens plus the stop token
   "<|im_end|>" only. By default the ViT is frozen there and each window encoded once
   (`DemoModel.freeze_vision`), so all compute goes to the LLM; --no-freeze-vision trains
   both, the ViT at a lower rate and with the object loss kept as an auxiliary term.

Micro-Batch Streaming: an effective batch of windows is split into micro-batches whose size
comes from a memory budget and the measured memory of one sample; micro-batches stream
through the model with gradient accumulation, and the loss is normalised by the number of
target tokens in the whole batch, so the accumulated gradient is the full-batch gradient
(per-micro-batch means would weight a token by the size of the micro-batch it fell in).

One training sample is one window with every question it can teach
(`training_questions`); the questions share the window's prefix (prompt + visual tokens),
which is run once and its KV cache repeated per question: causal attention makes that
exactly the per-question forward.

The package, by concern: `data` (suite building, samples, questions), `model` (DemoModel),
`mbs` (Micro-Batch Streaming) and `loop` (TrainConfig, the training run, its CLI).
"""
from codecsight.tools.train.data import (MAX_PRESENCE_QUESTIONS, STOCHASTIC_POLICY,
                                         TRAIN_SEED_BASE,
                                         TRAIN_WINDOW_FRAMES, Item, Sample, build_suite,
                                         items_for_step, policy_keep_masks,
                                         training_questions, worst_case_questions)
from codecsight.tools.train.loop import (STATE_FILE, VISION_BATCH, Progress, TrainConfig,
                                         add_arguments, command_line, evaluate_answers,
                                         init_weights, learning_rate, pretrain_vision, resize,
                                         run, say, train, training_card)
from codecsight.tools.train.mbs import MicroBatchStreamer, activation_bytes, parse_bytes
from codecsight.tools.train.model import AUX_BACKGROUND_WEIGHT, STOP_TOKEN, DemoModel

__all__ = [
    "AUX_BACKGROUND_WEIGHT", "DemoModel", "Item", "MAX_PRESENCE_QUESTIONS", "MicroBatchStreamer",
    "Progress", "STOCHASTIC_POLICY", "STATE_FILE", "STOP_TOKEN", "Sample", "TRAIN_SEED_BASE", "TRAIN_WINDOW_FRAMES",
    "TrainConfig", "VISION_BATCH", "activation_bytes", "add_arguments", "build_suite",
    "command_line", "evaluate_answers", "init_weights", "items_for_step", "learning_rate", "parse_bytes",
    "policy_keep_masks", "pretrain_vision", "resize", "run", "say", "train", "training_card",
    "training_questions", "worst_case_questions",
]
