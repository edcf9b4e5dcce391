import json
import random

import numpy as np
import pytest
import torch

from gan.ema import GeneratorEMA
from gan.models import build_discriminator, build_generator
from pipeline.checkpoint import (
    STATE,
    WEIGHTS,
    CheckpointError,
    TrainingState,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)


def make(seed):
    torch.manual_seed(seed)
    g = build_generator("dcgan", channels=1, resolution=8, z_dim=4, width=4, num_classes=3)
    d = build_discriminator("resnet", channels=1, resolution=8, width=4, num_classes=3)
    opt_g, opt_d = torch.optim.Adam(g.parameters(), 1e-3), torch.optim.Adam(d.parameters(), 2e-3)
    modules = {"generator": g, "generator_ema": GeneratorEMA(g, 1, 1).model, "discriminator": d}
    return modules, {"opt_g": opt_g, "opt_d": opt_d}


def train_a_little(modules, optimizers):
    for _ in range(2):
        for name, opt in optimizers.items():
            net = modules["generator" if name == "opt_g" else "discriminator"]
            opt.zero_grad()
            x = torch.randn(4, 4) if name == "opt_g" else torch.randn(4, 1, 8, 8)
            out = net(x, torch.tensor([0, 1, 2, 0]))
            out.square().mean().backward()
            opt.step()


STATE_0 = TrainingState(
    step=7, epoch=1, batch=3, params={"train": {"lr_g": 1e-3}}, dataset_hash="abc"
)


def test_round_trip_restores_weights_optimisers_rngs_and_position(tmp_path):
    modules, optimizers = make(0)
    train_a_little(modules, optimizers)
    torch.manual_seed(11)
    np.random.seed(12)
    random.seed(13)
    save_checkpoint(tmp_path / "ckpt", modules, optimizers, STATE_0)
    expected_draws = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])

    fresh_modules, fresh_optimizers = make(1)
    state = load_checkpoint(tmp_path / "ckpt", fresh_modules, fresh_optimizers)
    assert state == STATE_0
    for name in modules:
        for (k, a), b in zip(
            modules[name].state_dict().items(),
            fresh_modules[name].state_dict().values(),
            strict=True,
        ):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    for name in optimizers:
        saved, loaded = optimizers[name].state_dict(), fresh_optimizers[name].state_dict()
        assert saved["param_groups"][0]["lr"] == loaded["param_groups"][0]["lr"]
        for index, values in saved["state"].items():
            for key, value in values.items():
                torch.testing.assert_close(value, loaded["state"][index][key], rtol=0, atol=0)
    # the restored RNGs continue exactly where the saved ones were
    torch.testing.assert_close(torch.rand(3), expected_draws[0])
    assert np.array_equal(np.random.rand(3), expected_draws[1])
    assert [random.random() for _ in range(3)] == expected_draws[2]

    # ...and training continues identically from both (same inputs for both)
    torch.manual_seed(5)
    train_a_little(modules, optimizers)
    torch.manual_seed(5)
    train_a_little(fresh_modules, fresh_optimizers)
    for name in ("generator", "discriminator"):
        for a, b in zip(modules[name].parameters(), fresh_modules[name].parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_checkpoint_of_plain_adam_restored_into_fused_adam_keeps_the_fused_kernel(tmp_path):
    """Checkpoints from before gan.step.adam hold `fused: None` in their param groups; loading
    one must not turn the kernel that skips non-finite updates on the device off."""
    from gan.step import adam, skips_on_device

    modules, optimizers = make(0)  # plain Adam
    train_a_little(modules, optimizers)
    save_checkpoint(tmp_path / "ckpt", modules, optimizers, STATE_0)
    fresh_modules, _ = make(1)
    fused = {
        "opt_g": adam(fresh_modules["generator"].parameters(), 1e-3, (0.9, 0.999)),
        "opt_d": adam(fresh_modules["discriminator"].parameters(), 2e-3, (0.9, 0.999)),
    }
    load_checkpoint(tmp_path / "ckpt", fresh_modules, fused)
    assert all(skips_on_device(opt) for opt in fused.values())
    for name in optimizers:  # the state itself is the saved one
        saved, loaded = optimizers[name].state_dict(), fused[name].state_dict()
        assert loaded["param_groups"][0]["lr"] == saved["param_groups"][0]["lr"]
        for index, values in saved["state"].items():
            for key, value in values.items():
                torch.testing.assert_close(value, loaded["state"][index][key], rtol=0, atol=0)


def test_files_are_safetensors_and_json_only(tmp_path):
    modules, optimizers = make(0)
    save_checkpoint(tmp_path / "ckpt", modules, optimizers, STATE_0)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == sorted([WEIGHTS, STATE])
    assert json.loads((tmp_path / "ckpt" / STATE).read_text())["dataset_hash"] == "abc"
    assert (tmp_path / "ckpt" / WEIGHTS).read_bytes()[8:9] == b"{"  # safetensors JSON header


def test_non_finite_weights_are_never_written(tmp_path):
    modules, optimizers = make(0)
    save_checkpoint(tmp_path / "ckpt", modules, optimizers, STATE_0)
    before = (tmp_path / "ckpt" / WEIGHTS).read_bytes()
    with torch.no_grad():
        next(modules["discriminator"].parameters()).view(-1)[0] = float("nan")
    with pytest.raises(
        CheckpointError, match="refusing to checkpoint non-finite weights at step 7"
    ):
        save_checkpoint(tmp_path / "ckpt", modules, optimizers, STATE_0)
    assert (tmp_path / "ckpt" / WEIGHTS).read_bytes() == before


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import pipeline.checkpoint as checkpoint

    modules, optimizers = make(0)
    save_checkpoint(tmp_path / "ckpt", modules, optimizers, STATE_0)
    before = (tmp_path / "ckpt" / WEIGHTS).read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path / "ckpt", modules, optimizers, STATE_0)
    assert (tmp_path / "ckpt" / WEIGHTS).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary left behind


def test_pickles_and_strangers_are_refused(tmp_path):
    modules, optimizers = make(0)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save(modules["generator"].state_dict(), pickled / "model.pt")
    with pytest.raises(CheckpointError, match=r"not a ganpipe checkpoint.*model.pt.*never loaded"):
        load_checkpoint(pickled, modules, optimizers)
    with pytest.raises(CheckpointError, match="found nothing"):
        read_checkpoint(tmp_path / "missing")


def test_damaged_checkpoint_is_a_clear_error(tmp_path):
    modules, optimizers = make(0)
    save_checkpoint(tmp_path / "ckpt", modules, optimizers, STATE_0)
    weights = tmp_path / "ckpt" / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="is damaged"):
        read_checkpoint(tmp_path / "ckpt")


def test_a_damaged_file_is_named_with_what_is_wrong(tmp_path):
    """A truncated state.json was a JSONDecodeError in the driver, a truncated or changed
    weights file a worker traceback."""
    from pipeline.checkpoint import read_state

    modules, optimizers = make(0)
    ckpt = save_checkpoint(tmp_path / "ckpt", modules, optimizers, STATE_0)
    state, weights = ckpt / STATE, ckpt / WEIGHTS
    good_state, good_weights = state.read_bytes(), weights.read_bytes()

    state.write_bytes(good_state[:40])
    with pytest.raises(CheckpointError, match=rf"{state} is damaged \(not valid JSON"):
        read_state(ckpt)
    state.write_bytes(good_state)

    weights.write_bytes(good_weights[: len(good_weights) // 2])
    with pytest.raises(CheckpointError, match=rf"{weights} is damaged \(its sha256 differs"):
        read_checkpoint(ckpt)
    changed = bytearray(good_weights)
    changed[-1] ^= 1  # a flipped bit in the tensors: the header still reads fine
    weights.write_bytes(bytes(changed))
    with pytest.raises(CheckpointError, match=rf"{weights} is damaged"):
        read_state(ckpt)

    # a checkpoint written before the sha256 was recorded: the header against the size
    meta = json.loads(good_state)
    del meta["weights_sha256"]
    state.write_text(json.dumps(meta))
    weights.write_bytes(good_weights[:-10])
    with pytest.raises(CheckpointError, match=rf"{weights} is damaged \(.*not fully covered"):
        read_state(ckpt)
    weights.write_bytes(good_weights)
    assert read_state(ckpt)["step"] == 7


def test_the_newest_intact_checkpoint_is_found_and_the_damaged_ones_named(tmp_path):
    from dataclasses import replace

    from pipeline.checkpoint import newest_intact

    modules, optimizers = make(0)
    run = tmp_path / "run"
    old, new = (
        save_checkpoint(run / f"checkpoint_{i}", modules, optimizers, replace(STATE_0, step=s))
        for i, s in ((1, 4), (2, 8))
    )
    assert newest_intact([]) is None
    found = newest_intact([new, old])
    assert (found.path, found.state["step"], found.damaged) == (new, 8, [])
    (new / STATE).write_text("{")
    found = newest_intact([new, old])
    assert found.path == old and found.state["step"] == 4
    assert len(found.damaged) == 1 and f"{new / STATE} is damaged" in found.damaged[0]
    (old / WEIGHTS).write_bytes(b"")
    with pytest.raises(CheckpointError) as caught:
        newest_intact([new, old])
    message = str(caught.value)
    assert f"{new / STATE} is damaged" in message and f"{old / WEIGHTS} is damaged" in message
    assert "delete the run's directory under ray.storage_path" in message


def test_checkpoints_record_their_mlflow_run_and_older_ones_read_without_it(tmp_path):
    from dataclasses import replace

    modules, optimizers = make(0)
    ckpt = save_checkpoint(
        tmp_path / "ckpt", modules, optimizers, replace(STATE_0, mlflow_run_id="abc123")
    )
    assert load_checkpoint(ckpt, *make(1)).mlflow_run_id == "abc123"
    meta = json.loads((ckpt / STATE).read_text())
    del meta["mlflow_run_id"], meta["weights_sha256"]
    (ckpt / STATE).write_text(json.dumps(meta))
    assert load_checkpoint(ckpt, *make(1)) == STATE_0
