"""tools/compare_runs.py: identical folders pass whatever their wall times; one changed byte fails."""
import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("compare_runs", Path(__file__).parents[1] / "tools" / "compare_runs.py")
compare_runs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_runs)


def _run(d: Path, seconds: str, weights: bytes) -> Path:
    d.mkdir()
    (d / "model.safetensors").write_bytes(weights)
    (d / "trace.csv").write_text("step,stage,lr_head,lr_first,mom,loss\n0,head,0.001,0.001,0.95,2.3\n")
    (d / "metrics.csv").write_text(f"stage,epoch,train_loss,valid_loss,accuracy,seconds\nhead,1,1.5,1.4,0.65,{seconds}\n")
    return d


def test_same_training_other_wall_time_is_identical(tmp_path):
    a, b = _run(tmp_path / "a", "8.1", b"\x00\x01"), _run(tmp_path / "b", "9.7", b"\x00\x01")
    assert compare_runs.main([str(a), str(b)]) == 0


def test_one_weight_byte_or_a_missing_file_differs(tmp_path, capsys):
    a, b = _run(tmp_path / "a", "8.1", b"\x00\x01"), _run(tmp_path / "b", "8.1", b"\x00\x02")
    assert compare_runs.main([str(a), str(b)]) == 1
    assert "DIFFERENT  model.safetensors" in capsys.readouterr().out
    (b / "trace.csv").unlink()
    assert dict((n, s) for n, s, _ in compare_runs.compare(a, b))["trace.csv"] is False
