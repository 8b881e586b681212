"""`seshu generate` and `seshu chat`: argument parsing over `seshu.generate`.

Text goes to stdout as plain text (no rich markup), flushed piece by piece, so it streams in a terminal and
pipes cleanly; notices go to stderr.
"""

from __future__ import annotations

import contextlib
import sys

import typer

# Options shared by both commands. The defaults repeat `SamplingOptions`' own (a test checks they agree):
# importing seshu.generate here would pull torch into `seshu --help`.
_MODEL = typer.Option(..., "--model", help="Model folder or Hub id.")
_ADAPTER = typer.Option(None, "--adapter", help="PEFT LoRA adapter folder applied on top of the model.")
_DEVICE = typer.Option(None, "--device", help="cpu, cuda, cuda:1, mps; default the best there is.")
_MAX_NEW_TOKENS = typer.Option(128, "--max-new-tokens", help="Stop after this many new tokens.")
_TEMPERATURE = typer.Option(0.8, "--temperature", help="Sampling temperature; 0 is greedy (deterministic).")
_TOP_P = typer.Option(0.95, "--top-p", help="Sample from the likeliest tokens holding this much mass; 1 is off.")
_TOP_K = typer.Option(50, "--top-k", help="Sample from the k likeliest tokens; 0 is off.")
_REPETITION_PENALTY = typer.Option(1.1, "--repetition-penalty", help="Above 1 discourages repeating tokens; 1 is off.")
_SEED = typer.Option(0, "--seed", help="Same seed, same text.")
_IMAGE = typer.Option(None, "--image", help="Image for a VLM (from `seshu vlm build`) to look at.")
_AUDIO = typer.Option(None, "--audio", help="Speech for a VLM: its first 10 s are transcribed into the turn.")
_WHISPER = typer.Option(
    None, "--whisper", help="Whisper for --audio (folder or Hub id); default the tiny.en the speech extra bundles."
)


def register(app: typer.Typer) -> None:
    """Add the top-level `generate` and `chat` commands to `app`."""
    app.command("generate")(generate_command)
    app.command("chat")(chat_command)


def _echo(text: str) -> None:
    typer.echo(text, nl=False)  # click.echo flushes, so each piece shows up as it is made


def generate_command(
    model: str = _MODEL,
    prompt: str = typer.Option(..., "--prompt", help="Text to continue; '-' reads it from stdin."),
    adapter: str | None = _ADAPTER,
    max_new_tokens: int = _MAX_NEW_TOKENS,
    temperature: float = _TEMPERATURE,
    top_p: float = _TOP_P,
    top_k: int = _TOP_K,
    repetition_penalty: float = _REPETITION_PENALTY,
    seed: int = _SEED,
    device: str | None = _DEVICE,
    image: str | None = _IMAGE,
    audio: str | None = _AUDIO,
    whisper: str | None = _WHISPER,
) -> None:
    """Continue a prompt, streaming the text as it is made; a VLM answers it as a user turn, with --image and
    --audio."""
    from seshu.cli.common import quiet_libraries
    from seshu.generate import SamplingOptions, generate_text, load_for_generation
    from seshu.multimodal.generate import check_media, generate_vlm, load_vlm_for_generation, read_media

    quiet_libraries()  # stdout holds only the generated text
    options = SamplingOptions(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)
    text = sys.stdin.read() if prompt == "-" else prompt
    if check_media(model, image, audio):
        media = read_media(image, audio, whisper=whisper, device=device, log=_notice)
        generate_vlm(load_vlm_for_generation(model, device, adapter), text, media, options, _echo)
        typer.echo()
        return
    lm, tokenizer = load_for_generation(model, adapter, device)
    generate_text(lm, tokenizer, text, options, _echo)
    typer.echo()


def _notice(line: str) -> None:
    typer.echo(line, err=True)


def _read_line() -> str | None:
    try:
        return input("> ")
    except EOFError:
        return None


def chat_command(
    model: str = _MODEL,
    adapter: str | None = _ADAPTER,
    system: str | None = typer.Option(None, "--system", help="System message that starts the conversation."),
    max_new_tokens: int = _MAX_NEW_TOKENS,
    temperature: float = _TEMPERATURE,
    top_p: float = _TOP_P,
    top_k: int = _TOP_K,
    repetition_penalty: float = _REPETITION_PENALTY,
    seed: int = _SEED,
    device: str | None = _DEVICE,
    image: str | None = _IMAGE,
    audio: str | None = _AUDIO,
    whisper: str | None = _WHISPER,
) -> None:
    """Chat with a model through its tokenizer's chat template (/reset clears, /exit or Ctrl-D quits); with a
    VLM, --image and --audio go into the first turn."""
    from seshu.cli.common import quiet_libraries
    from seshu.generate import SamplingOptions, chat_loop, load_for_generation
    from seshu.multimodal.generate import chat_vlm, check_media, load_vlm_for_generation, read_media

    quiet_libraries()
    options = SamplingOptions(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)
    vlm = check_media(model, image, audio)
    if vlm:
        media = read_media(image, audio, whisper=whisper, device=device, log=_notice)
        loaded = load_vlm_for_generation(model, device, adapter)
    else:
        lm, tokenizer = load_for_generation(model, adapter, device)
    typer.echo(f"chatting with {model}; /reset clears the conversation, /exit or Ctrl-D quits", err=True)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends the chat like Ctrl-D, without a traceback
        if vlm:
            chat_vlm(loaded, media, options, _read_line, _echo, system=system)
        else:
            chat_loop(lm, tokenizer, options, _read_line, _echo, system=system)
    typer.echo()
