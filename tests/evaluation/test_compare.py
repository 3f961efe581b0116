"""bpnp.evaluation.compare: rows of two summary tables paired by run name."""

from bpnp.evaluation.compare import compare_rows, main, read_rows

HEADER = ("| run | n | network success | median rot. err. | match acc. | RANSAC-only success | "
          "RANSAC-only median rot. err. | true matches success | without pose search | time per instance |\n"
          "|---|---|---|---|---|---|---|---|---|---|\n")


def _row(name, succ, acc, ransac, time):
    return f"| {name} | 40 | {succ} | 0.2 deg | {acc} | {ransac} | 1.0 deg | 100.0 % | 90.0 %, 0.2 deg | {time} |\n"


def test_rows_pair_by_name_and_skip_other_tables(tmp_path):
    before = "text\n| a | b |\n|---|---|\n| x | y |\n" + HEADER + _row("real_easy_x", "60.0 %", "5.0 %", "50.0 %", "1.0 s")
    after = HEADER + _row("realft_easy_x", "70.0 %", "6.0 %", "55.0 %", "0.9 s") + _row("new_set", "10.0 %", "1.0 %", "5.0 %", "2.0 s")
    rows = read_rows(before)
    assert list(rows) == ["real_easy_x"]  # the 2-column table is not a summary table
    table = compare_rows(rows, read_rows(after), {"real_": "realft_"})
    lines = table.splitlines()
    assert lines[2] == "| new_set | - | 10.0 % | - / 5.0 % | - / 1.0 % | 2.0 s |"
    assert lines[3] == "| realft_easy_x | 60.0 % | **70.0 %** | 50.0 % / 55.0 % | 5.0 % / 6.0 % | 0.9 s |"
    (tmp_path / "b.md").write_text(before)
    (tmp_path / "a.md").write_text(after)
    assert main([str(tmp_path / "b.md"), str(tmp_path / "a.md"), "--rename", "real_=realft_"]) == 0


def test_bad_input_is_one_line(tmp_path, capsys):
    (tmp_path / "a.md").write_text("no table\n")
    assert main([str(tmp_path / "missing.md"), str(tmp_path / "a.md")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "b.md").write_text("")
    assert main([str(tmp_path / "b.md"), str(tmp_path / "a.md")]) == 2
    assert "no summary-table rows" in capsys.readouterr().err
    assert main([str(tmp_path / "b.md"), str(tmp_path / "a.md"), "--rename", "x"]) == 2
