"""Learning curve: epoch minutes from the console's progress bars, validation points from the CSV."""

from __future__ import annotations

from bpnp.evaluation.learning_curve import epoch_minutes, main, validation_points

CONSOLE = ("Epoch 0:  50%|#####     | 125/250 [00:59<00:59,  2.09it/s]\r"
           "Epoch 0: 100%|##########| 250/250 [01:59<00:00,  2.09it/s]\r"
           "Epoch 0:   0%|          | 0/250 [00:00<?, ?it/s]\r"  # tqdm's reset before the rename
           "Epoch 1: 100%|##########| 250/250 [02:00<00:00,  2.08it/s, val_succ=0.1]\r"
           "Epoch 2: 100%|##########| 250/250 [1:01:30<00:00,  0.07it/s]\n")


def test_minutes_and_points(tmp_path):
    minutes = epoch_minutes(CONSOLE)
    assert minutes == {0: 1 + 59 / 60, 1: 2.0, 2: 61.5}
    run = tmp_path / "run"
    (run / "csv").mkdir(parents=True)
    (run / "csv" / "metrics.csv").write_text(
        "epoch,step,train/loss,val/success,val/ransac_success,val/match_acc\n"
        "0,10,3.0,,,\n1,500,,0.25,0.2,0.05\n2,750,2.0,,,\n")
    pts = validation_points(run / "csv" / "metrics.csv", minutes)
    assert len(pts) == 1 and pts[0]["epoch"] == 1 and abs(pts[0]["minutes"] - (3 + 59 / 60)) < 1e-9
    assert pts[0]["val/success"] == 0.25 and pts[0]["val/match_acc"] == 0.05
    (tmp_path / "console.log").write_text(CONSOLE)
    assert main([str(run), "--console", str(tmp_path / "console.log"), "--out", str(tmp_path / "lc.png")]) == 0
    assert (tmp_path / "lc.png").stat().st_size > 0
    assert main([str(tmp_path / "nope"), "--console", str(tmp_path / "console.log")]) == 2
