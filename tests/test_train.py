"""Micro-Batch Streaming training: same path as serving, exact gradient accumulation."""
import json

import numpy as np
import pytest
import torch

from codecsight.tools import synth, train
from codecsight.checkpoint import Geometry, load
from codecsight.tools.synth import SceneConfig
from codecsight.vision import patchify

SCENE = SceneConfig(seconds=8.0)   # two 4 s windows per clip


@pytest.fixture(scope="module")
def geometry(tiny_dir):
    return Geometry.from_model_dir(tiny_dir)


@pytest.fixture(scope="module")
def samples(geometry):
    """Four windows of two generated clips, served the way the pipeline windows them."""
    return train.build_suite([101, 102], geometry, scene=SCENE, analysis_fps=2.0,
                             window_seconds=4.0)


@pytest.fixture
def demo(tiny_dir, geometry):
    """A fresh copy of the tiny model with the training-only object head."""
    model, tokenizer = load(tiny_dir)
    torch.manual_seed(0)
    return train.DemoModel(model, tokenizer, geometry, aux_head=True)


def items_with_pruning(samples, seed=0, pruned=(0, 2)):
    """One item per sample; the pruned ones keep a random half of their merge groups."""
    rng = np.random.default_rng(seed)
    items = []
    for i, s in enumerate(samples):
        policy = "dense"
        if i in pruned:
            s.keep.setdefault("half", rng.random(s.keep["dense"].shape) < 0.5)
            policy = "half"
        items.append(train.Item(s, policy, synth.ask(s.facts, rng)))
    return items


def gradients(demo, items, micro_batch_size, aux_weight=0.5):
    for p in demo.parameters():
        p.grad = None
    streamer = train.MicroBatchStreamer(demo, 1 << 30, aux_weight=aux_weight)
    stats = streamer.accumulate(items, micro_batch_size)
    # A parameter the loss does not reach has no .grad: its gradient is zero.
    return stats, [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                   for p in demo.parameters()]


def relative_difference(a, b):
    num = torch.sqrt(sum(((x - y) ** 2).sum() for x, y in zip(a, b)))
    return float(num / torch.sqrt(sum((y ** 2).sum() for y in b)))


def test_suite_windows_are_the_served_windows(samples):
    assert len(samples) == 4
    assert [s.frame_indices.tolist() for s in samples[:2]] == [list(range(0, 40, 5)),
                                                               list(range(40, 80, 5))]
    assert samples[0].rgb.shape == (8, 168, 224, 3)
    assert samples[0].keep["dense"].shape == (8, 6, 8)


def test_accumulated_gradient_equals_the_full_batch_gradient(demo, samples):
    """Micro-batches of 3 and 1 windows with different visual and target token counts."""
    items = items_with_pruning(samples) + items_with_pruning(samples[:1], seed=1, pruned=())
    items[-1].qas = items[-1].qas[:2]              # fewer questions: fewer target tokens
    full, g_full = gradients(demo, items, micro_batch_size=len(items))
    streamed, g_streamed = gradients(demo, items, micro_batch_size=3)
    assert streamed["micro_batches"] == 2 and full["micro_batches"] == 1
    counts = [demo.target_tokens(items[:3]), demo.target_tokens(items[3:])]
    assert counts[0] != 3 * counts[1]              # unequal tokens per sample
    assert relative_difference(g_streamed, g_full) < 1e-5
    assert streamed["loss"] == pytest.approx(full["loss"], rel=1e-6)


def test_per_micro_batch_means_would_bias_the_update(demo, samples):
    """The reason for batch-level normalisation: averaging micro-batch means is different."""
    items = items_with_pruning(samples)
    items[-1].qas = items[-1].qas[:1]
    _, g_full = gradients(demo, items, micro_batch_size=len(items), aux_weight=0.0)
    demo.model.zero_grad(set_to_none=True)
    chunks = [items[:3], items[3:]]
    for chunk in chunks:
        loss, _, stats = demo.loss_sum(chunk)
        (loss / stats["tokens"] / len(chunks)).backward()
    g_naive = [p.grad.detach().clone() for p in demo.model.parameters()]
    g_full = g_full[:len(g_naive)]
    assert relative_difference(g_naive, g_full) > 1e-2


def test_batched_logits_equal_each_questions_own_served_forward(demo, samples):
    """Windows of different lengths (pruned, shortened) in one padded, masked batch."""
    items = items_with_pruning(samples[:2], pruned=(0,))
    items.append(train.Item(samples[2], "dense", items[1].qas[:2], np.arange(3, 6)))
    with torch.no_grad():
        windows = demo.encode_frames(items)
        assert len({sum(len(f.tokens) for f in w) for w in windows}) == 3
        answers = [[demo.answer_ids(qa.answer) for qa in item.qas] for item in items]
        logits = demo.batch_logits(windows, [[qa.question for qa in item.qas]
                                             for item in items], answers)
        for item, frames, window_logits in zip(items, windows, logits):
            for q, qa in enumerate(item.qas):
                served = demo.vlm.answer_full(frames, qa.question).first_logits
                torch.testing.assert_close(window_logits[q, 0], served, atol=1e-5, rtol=1e-5)


def test_per_frame_vit_batch_equals_the_served_patch_set(demo, samples, geometry):
    item = items_with_pruning(samples[:1], pruned=(0,))[0]
    with torch.no_grad():
        frames = demo.encode_frames([item])[0]
    patches, positions = patchify(item.sample.rgb, geometry, item.sample.t,
                                  item.sample.keep["half"], item.sample.previous_rgb)
    served = demo.encoder.encode(patches, positions)          # one set, as vit_pruned gets it
    ours = torch.cat([f.tokens for f in frames]).detach().numpy()
    assert ours.shape == served.shape == (item.sample.keep["half"].sum(), 128)
    np.testing.assert_allclose(ours, served, atol=1e-5)
    assert [len(f.tokens) for f in frames] == item.sample.keep["half"].sum(axis=(1, 2)).tolist()


def test_target_tokens_are_the_answer_and_the_stop_token(demo):
    assert demo.answer_ids("yes") == [demo.tokenizer.convert_tokens_to_ids("yes"),
                                      demo.tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_micro_batch_size_comes_from_the_budget_and_the_measured_sample(demo, samples):
    item = items_with_pruning(samples, pruned=())[0]
    streamer = train.MicroBatchStreamer(demo, 0)
    sample_bytes = streamer.measure(item)
    # At least the patch input and the ViT's per-layer activations: MiBs, not bytes.
    assert sample_bytes > item.sample.keep["dense"].sum() * 4 * 1176 * 4
    fixed = streamer.fixed_bytes
    assert fixed == 4 * 4 * sum(p.numel() for p in demo.parameters())
    for k in (1, 3, 7):
        streamer.memory_budget = fixed + k * sample_bytes + sample_bytes // 2
        assert streamer.micro_batch_size() == k
    streamer.memory_budget = fixed + sample_bytes - 1
    with pytest.raises(ValueError, match="too small.*give at least"):
        streamer.micro_batch_size()


def test_memory_budget_flag_takes_bytes_and_units():
    assert train.parse_bytes("1073741824") == 1 << 30
    assert train.parse_bytes("512MiB") == 512 << 20
    assert train.parse_bytes("1GB") == 10 ** 9
    with pytest.raises(Exception, match="not a byte count"):
        train.parse_bytes("lots")


def test_each_step_draws_the_same_batch_for_the_same_seed(samples):
    a = train.items_for_step(samples, 3, 2, seed=7)
    b = train.items_for_step(samples, 3, 2, seed=7)
    c = train.items_for_step(samples, 3, 2, seed=8)
    assert [(i.sample.clip_seed, i.sample.window, i.qas) for i in a] == \
        [(i.sample.clip_seed, i.sample.window, i.qas) for i in b]
    assert [(i.sample.window, i.qas) for i in a] != [(i.sample.window, i.qas) for i in c]
    # One epoch visits every sample once.
    epoch = [train.items_for_step(samples, s, 2, seed=7) for s in range(2)]
    assert sorted((i.sample.clip_seed, i.sample.window) for step in epoch for i in step) == \
        sorted((s.clip_seed, s.window) for s in samples)


def test_a_few_steps_lower_the_loss(demo, samples):
    items = train.items_for_step(samples, 0, 4, seed=0)
    params = list(demo.model.parameters())
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    streamer = train.MicroBatchStreamer(demo, 1 << 30)
    losses = []
    for _ in range(8):
        losses.append(streamer.accumulate(items, 2)["loss"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert losses[-1] < 0.5 * losses[0]


def run_training(out, steps=4, resume=False, stop_after=None):
    config = train.TrainConfig(out_dir=str(out), seed=3, clips=2, steps=steps, batch_size=2,
                               memory_budget=1 << 30, warmup_steps=1, checkpoint_every=3,
                               val_clips=1, clip_seconds=8.0, vision_steps=3)
    return train.train(config, resume=resume, stop_after=stop_after)


def test_training_writes_a_servable_checkpoint_and_resumes_exactly(tmp_path):
    straight = run_training(tmp_path / "straight")
    stopped = run_training(tmp_path / "resumed", stop_after=2)
    assert stopped["stopped_at"] == 2
    assert torch.load(tmp_path / "resumed" / train.STATE_FILE, weights_only=False)["step"] == 2
    resumed = run_training(tmp_path / "resumed", resume=True)
    assert resumed["final_loss"] == straight["final_loss"]
    a, _ = load(tmp_path / "straight")
    b, _ = load(tmp_path / "resumed")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert straight["train_windows"] == 4 and straight["micro_batch_size"] == 2
    saved = json.loads((tmp_path / "straight" / "training_summary.json").read_text())
    assert saved["final_loss"] == straight["final_loss"]
    assert Geometry.from_model_dir(tmp_path / "straight").group_pixels == 28


def test_resuming_with_other_settings_is_a_usage_error_not_an_exit(tmp_path):
    from codecsight.tools import UsageError

    out = tmp_path / "run"
    out.mkdir()
    torch.save({"config": {"seed": 99}}, out / train.STATE_FILE)
    config = train.TrainConfig(out_dir=str(out), seed=3, clips=1, steps=1, val_clips=1,
                               clip_seconds=4.0, vision_steps=0)
    with pytest.raises(UsageError, match="was written with different settings"):
        train.train(config, resume=True)


def test_a_frozen_vit_serves_the_tokens_it_would_compute(demo, samples):
    item = train.Item(samples[1], "dense", [], np.arange(2, 5))
    with torch.no_grad():
        live = demo.encode_frames([item])[0]
    demo.freeze_vision(samples, ["dense"])
    cached = demo.encode_frames([item])[0]
    assert [f.t for f in cached] == [f.t for f in live] == samples[1].t[2:5].tolist()
    for a, b in zip(cached, live):
        torch.testing.assert_close(a.tokens, b.tokens)
    assert not any(p.requires_grad for p in demo.model.model.visual.parameters())
    assert demo.frozen_bytes() == sum(s.keep["dense"].sum() for s in samples) * 128 * 4 + \
        sum(s.keep["dense"].sum() for s in samples) * 2 * 8


def test_training_questions_cover_every_task_and_balance_yes_and_no(samples):
    rng = np.random.default_rng(0)
    single = train.training_questions(samples[0].facts, rng, frames=1)
    assert {qa.task for qa in single} == {"presence"}
    full = train.training_questions(samples[0].facts, rng, frames=8)
    assert {qa.task for qa in full} == set(synth.TASKS)
    presence = [qa.answer for qa in full if qa.task == "presence"]
    yes = presence.count("yes")
    assert presence.count("no") == max(1, yes)


def test_the_vision_stage_teaches_the_vit_what_each_merge_group_shows(demo, samples):
    losses = train.pretrain_vision(demo, samples, steps=30, lr=3e-3, seed=0)
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])


def test_pruned_training_windows_keep_what_the_server_keeps(geometry):
    """--policies dense,codec: keep masks come from the server's own StreamParser."""
    from codecsight.protocol import PATCH_POLICIES

    if "codec" not in PATCH_POLICIES:
        pytest.skip("this build has no codec policy")
    samples = train.build_suite([103], geometry, scene=SCENE, analysis_fps=2.0,
                                window_seconds=4.0, policies=("dense", "codec"))
    for s in samples:
        codec, dense = s.keep["codec"], s.keep["dense"]
        assert codec.shape == dense.shape and not (codec & ~dense).any()
    assert samples[0].keep["codec"][0].all()                 # the stream's first frame: whole
    kept = sum(s.keep["codec"].sum() for s in samples) / sum(s.keep["dense"].sum()
                                                             for s in samples)
    assert 0.05 < kept < 0.9


def test_stochastic_pruning_keeps_codecs_groups_and_a_random_share_of_the_rest(geometry):
    """--policies mix: every visit keeps at least what codec keeps, at rates codec..dense."""
    samples = train.build_suite([103], geometry, scene=SCENE, analysis_fps=2.0,
                                window_seconds=4.0, policies=("mix",))
    assert set(samples[0].keep) == {"dense", "codec"}
    shares = []
    for step in range(12):
        for item in train.items_for_step(samples, step, 2, seed=0, policies=("mix",)):
            codec = item.sample.keep["codec"]
            assert item.mask is not None and not (codec & ~item.mask).any()
            shares.append(item.mask.mean())
    assert min(shares) < 0.6 < 0.8 < max(shares)
    assert len(set(np.round(shares, 3))) > 6        # a different rate per visit


def test_a_frozen_vit_serves_a_stochastic_visit_its_groups_dense_tokens(demo, samples):
    mask = np.zeros_like(samples[0].keep["dense"])
    mask[:, 1, 2] = mask[:, 3, 4] = True
    item = train.Item(samples[0], "mix", [], None, mask)
    demo.freeze_vision(samples, ["dense", "mix"])
    dense = demo.encode_frames([train.Item(samples[0], "dense", [])])[0]
    frames = demo.encode_frames([item])[0]
    assert demo.visual_tokens([item]) == 2 * len(frames)
    for f, d in zip(frames, dense):
        assert f.cells.tolist() == [[1, 2], [3, 4]]
        rows = [int(np.flatnonzero((d.cells == c).all(1))[0]) for c in f.cells]
        torch.testing.assert_close(f.tokens, d.tokens[rows])


def test_capacity_flags_resize_the_model_and_init_from_copies_matching_weights(tmp_path,
                                                                                tiny_dir):
    from codecsight import checkpoint

    config = train.TrainConfig(out_dir=str(tmp_path), llm_layers=2, llm_width=192,
                               vision_depth=3, vision_width=96)
    checkpoint.build_tiny(tmp_path / "m")
    train.resize(tmp_path / "m", config)
    model, _ = load(tmp_path / "m")
    text, vision = model.config.text_config, model.config.vision_config
    assert (text.num_hidden_layers, text.hidden_size, vision.depth, vision.embed_dim,
            vision.hidden_size) == (2, 192, 3, 96, 192)
    with pytest.raises(ValueError, match="multiple of 64"):
        train.resize(tmp_path / "m", train.TrainConfig(out_dir="", llm_width=100))
    # Same shapes everywhere: all tensors copied; deeper: all but the added layers'.
    small, _ = load(tiny_dir)
    assert train.init_weights(small, tiny_dir) == len(small.state_dict())
    checkpoint.build_tiny(tmp_path / "deep")
    train.resize(tmp_path / "deep", train.TrainConfig(out_dir="", llm_layers=6))
    deep, _ = load(tmp_path / "deep")
    added = [k for k in deep.state_dict() if ".layers.4." in k or ".layers.5." in k]
    assert train.init_weights(deep, tiny_dir) == len(deep.state_dict()) - len(added) > 0
    assert "--llm-width 192" in train.command_line(config)
    # the training card says how much --init-from really copied
    from codecsight.tools.train.loop import _initialised

    deeper = train.TrainConfig(out_dir="", llm_layers=6, init_from="models/x")
    assert _initialised(deeper, {"initialised_tensors": [82, 130]}) == \
        ", then 82 of 130 tensors (those whose name and shape match) from models/x"
    assert _initialised(train.TrainConfig(out_dir=""), {"initialised_tensors": None}) == ""


def test_the_training_card_says_when_stage_one_was_skipped():
    """An uptraining run (--vision-steps 0) trains no ViT: the card must not report a stage 1."""
    from codecsight.tools.train.loop import _stage_one

    uptrain = train.TrainConfig(out_dir="", vision_steps=0, init_from="models/x")
    assert _stage_one(uptrain, {"vision_loss": None}) == \
        "Stage 1 skipped (--vision-steps 0): the ViT and merger start as initialised (models/x)."
    full = _stage_one(train.TrainConfig(out_dir="", vision_steps=2000, vision_lr=0.001),
                      {"vision_loss": [1.5625, 0.228]})
    assert full.startswith("Stage 1 (2000 steps, lr 0.001): the ViT learns what each\n")
    assert full.endswith("loss 1.562 -> 0.228.")


def test_training_refuses_vllm_evs_whose_pruning_is_after_the_vit(geometry):
    # Its windows would be dense patch masks: training on them would be dense under another name.
    with pytest.raises(ValueError, match="vllm_evs prunes visual tokens after the ViT"):
        train.build_suite([101], geometry, scene=SCENE, analysis_fps=2.0, window_seconds=4.0,
                          policies=("dense", "vllm_evs"))
