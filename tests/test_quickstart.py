from pathlib import Path

from seshu import quickstart


def test_quickstart_runs_the_whole_loop_and_perplexity_falls(tmp_path: Path) -> None:
    lines: list[str] = []
    result = quickstart.run(tmp_path, max_steps=80, log=lines.append)
    assert result.perplexity_after < result.perplexity_before / 4
    assert (result.model_dir / "model.safetensors").is_file()
    assert (result.tokenizer_dir / "tokenizer.json").is_file()
    assert set(result.samples) == set(quickstart.PROMPTS)
    assert all(result.samples.values())
    assert [line for line in lines if line.startswith("[")][-1] == "[5/5] samples"
    assert any("tok/s" in line for line in lines)
    assert lines[-2:] == [f"      {prompt}{result.samples[prompt]}" for prompt in quickstart.PROMPTS]

    # Running it again replaces its own outputs instead of refusing or mixing runs.
    again = quickstart.run(tmp_path, max_steps=2)
    assert again.model_dir == result.model_dir
