from pathlib import Path

from seshu import quickstart


def test_quickstart_runs_the_whole_loop_and_perplexity_falls(tmp_path: Path, capsys) -> None:
    result = quickstart.run(tmp_path, max_steps=80)
    assert result.perplexity_after < result.perplexity_before / 4
    assert (result.model_dir / "model.safetensors").is_file()
    assert (result.tokenizer_dir / "tokenizer.json").is_file()
    assert set(result.samples) == set(quickstart.PROMPTS)
    assert all(result.samples.values())
    printed = capsys.readouterr().out
    assert "[5/5] samples" in printed and "tok/s" in printed

    # Running it again replaces its own outputs instead of refusing or mixing runs.
    again = quickstart.run(tmp_path, max_steps=2)
    assert again.model_dir == result.model_dir
