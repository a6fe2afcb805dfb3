"""The console commands print through: a table sent to a file or a pipe keeps its labels whole."""

from kvlab.cli.common import console, make_table


def test_a_wide_table_printed_to_a_pipe_keeps_its_labels(capsys, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    label = "a3:check_layer=1,scout=true,pool=7@0.15"
    table = make_table("mixed", ["strategy", "acc", "95% CI", "=full", "=8tok", "TTFT s", "speedup", "n"], labels=1)
    table.add_row(label, "0.417", "0.29-0.56", "0.48", "0.90", "1.994", "2.96x", "48")
    console().print(table)
    printed = capsys.readouterr().out
    assert label in printed and "speedup" in printed and "…" not in printed
