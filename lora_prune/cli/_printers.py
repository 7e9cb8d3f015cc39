"""What the commands print: one function per result type, and the progress bar.

Printers take the library's dataclasses and write text with click; they compute
nothing the result does not hold.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import click

from ..analysis import Analysis, RenderStats, Shard
from ..blocks import format_block_spec
from ..budget import BudgetCandidate
from ..families import Family
from ..lora import LoraFile
from ..recipes import input_ranks, recipes_for
from ..slim import SlimResult
from ..stats import LoraReport
from ..units import human_bytes
from ..verify import VerifyResult


def share(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _counter_text(counts: dict[Any, int], fmt: Callable[[Any], str] = str) -> str:
    if not counts:
        return "none"
    return ", ".join(f"{fmt(k)} x{v}" for k, v in counts.items())


def _alpha_text(alpha: float) -> str:
    return f"{alpha:g}"


def print_report(report: LoraReport) -> None:
    echo = click.echo
    echo(f"file          {report.path} ({human_bytes(report.file_bytes)})")
    echo(f"family        {report.family}")
    grammars = ", ".join(f"{g} ({n} keys)" for g, n in report.grammars.items())
    echo(f"format        {report.format}" + (f"  [{grammars}]" if len(report.grammars) > 1 else ""))
    echo(
        f"tensors       {sum(b.tensors for b in report.blocks)}, {report.total_params:,} parameters"
    )
    echo(f"dtypes        {_counter_text(report.dtypes)}")
    echo(f"adapters      {_counter_text(report.adapters)}")
    echo(f"ranks         {_counter_text(report.ranks)}")
    echo(
        f"alphas        {_counter_text(report.alphas, _alpha_text) if report.alphas else 'none (scale 1)'}"
    )
    echo(f"text encoders {', '.join(report.text_encoders) or 'none'}")
    echo(f"metadata      {report.metadata_keys} keys")
    for key, value in report.metadata.items():
        shown = value if len(value) <= 70 else value[:67] + "..."
        echo(f"  {key} = {shown}")
    echo("")
    header = f"{'block':<10} {'modules':>7} {'tensors':>7} {'params':>12} {'bytes':>10} {'size%':>6} {'norm':>10} {'norm%':>6}"
    echo(header)
    echo("-" * len(header))
    for b in report.blocks:
        echo(
            f"{b.block:<10} {b.modules:>7} {b.tensors:>7} {b.params:>12,} {human_bytes(b.bytes):>10} "
            f"{100 * b.share_bytes:>5.1f}% {b.norm:>10.4g} {100 * b.share_norm:>5.1f}%"
        )
    echo("-" * len(header))
    echo(
        f"{'total':<10} {sum(b.modules for b in report.blocks):>7} "
        f"{sum(b.tensors for b in report.blocks):>7} {report.total_params:>12,} "
        f"{human_bytes(report.total_bytes):>10} {100.0:>5.1f}% {report.total_norm:>10.4g}"
    )


class ProgressBar:
    """A click progress bar fed by the library's (done, total) callbacks.

    Only on a terminal: in a log, click would write the label again for every
    phase (ranking, then the pruning curve) and the summary lines say the rest.
    """

    def __init__(self, label: str) -> None:
        self.label = label
        self.bar: Any = None
        self.done = 0
        self.shown = sys.stderr.isatty()

    def __call__(self, done: int, total: int) -> None:
        if not self.shown:
            return
        if self.bar is not None and (done < self.done or total != self.bar.length):
            self.close()  # a new phase (ranking, then the pruning curve) starts a new bar
        if self.bar is None:
            self.bar = click.progressbar(
                length=total, label=self.label, show_eta=True, show_pos=True, file=sys.stderr
            )
            self.bar.__enter__()
        self.bar.update(done - self.done)
        self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar, self.done = None, 0

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def print_tried(tried: Sequence[object]) -> None:
    """The files ``slim --auto --max-size`` tried: blocks, rank, size, share kept, verdict.

    ``object``: a :class:`~lora_prune.errors.BudgetError` carries them untyped (errors
    import nothing of the library).
    """
    for c in tried:
        assert isinstance(c, BudgetCandidate)
        verdict = "not rendered" if c.passed is None else ("pass" if c.passed else "FAIL")
        click.echo(
            f"tried    {c.label}: {human_bytes(c.bytes)}, kept {share(c.kept_share)}, {verdict}"
        )


def print_slim(
    result: SlimResult,
    lora: LoraFile,
    *,
    recipes: bool = False,
    implied: frozenset[str] = frozenset(),
) -> None:
    """``implied``: blocks the spec kept without naming them, whose absence is not noted."""
    absent = [b for b in result.absent if b not in implied]
    if absent:
        click.echo(
            f"note: the LoRA has no {format_block_spec(absent)}; nothing to keep there",
            err=True,
        )
    click.echo(f"kept     {format_block_spec(result.kept_blocks)}")
    click.echo(f"dropped  {format_block_spec(result.dropped_blocks) or 'nothing'}")
    ratio = result.bytes_after / result.bytes_before if result.bytes_before else 1.0
    click.echo(
        f"size     {human_bytes(result.bytes_before)} -> {human_bytes(result.bytes_after)} "
        f"({100 * ratio:.1f}%), {result.tensors_before} -> {result.tensors_after} tensors"
    )
    click.echo(f"wrote    {result.output}")
    if recipes:
        print_recipes(lora.family, result.kept_blocks, input_ranks(lora))
    else:
        click.echo(_RECIPES_HINT)


_RECIPES_HINT = (
    "retrain  --recipes prints the kohya, ai-toolkit and OneTrainer settings for these blocks"
)


def print_recipes(family: Family, blocks: Sequence[str], ranks: tuple[int, ...] | None) -> None:
    click.echo("\nto retrain only these blocks:")
    for recipe in recipes_for(family, blocks, input_ranks=ranks):
        click.echo(f"  {recipe.trainer} ({recipe.where}):")
        for line in recipe.text.split("\n"):
            click.echo(f"    {line}")
        if recipe.note:
            click.echo(f"    note: {recipe.note}")


def print_ranking(analysis: Analysis, limit: int = 15, planted: Sequence[str] = ()) -> None:
    for mode in analysis.settings.render.modes:
        rows = analysis.rows_for(mode)
        ref = "no LoRA" if mode == "solo" else "full LoRA"
        click.echo(
            f"\n{mode}: one {'block on' if mode == 'solo' else 'block off'}, compared to {ref}"
        )
        mark = "  planted" if planted else ""
        click.echo(
            f"{'rank':>4}  {'block':<10} {'MSE':>10} {'+-':>8} {'SSIM':>7} {'norm':>9}{mark}"
        )
        for row in rows[:limit]:
            flag = ("  *" if row.block in planted else "") if planted else ""
            click.echo(
                f"{row.rank:>4}  {row.block:<10} {row.mse:>10.2f} {row.mse_std:>8.2f} "
                f"{row.ssim:>7.4f} {row.norm:>9.3g}{flag}"
            )
        if len(rows) > limit:
            click.echo(f"  ... {len(rows) - limit} more blocks in ranking.csv")
        rho = analysis.spearman.get(mode)
        if rho is not None:
            click.echo(f"Spearman (render rank vs weight-norm rank): {rho:.3f}")


def print_suggestion(analysis: Analysis, *, recipes: bool = False) -> None:
    s = analysis.suggestion
    if s.command is None:
        click.echo("\nno block changes the image: nothing to keep")
        return
    if s.criterion == "kept_share" and s.kept:
        click.echo(
            f"\nsuggested keep (pruning curve: keeps at worst {share(min(s.kept.values()))} "
            f"of the LoRA's effect): {s.spec}"
        )
    else:
        click.echo(
            f"\nsuggested keep ({s.mode}, {100 * s.coverage:.0f}% of the influence, target "
            f"{100 * s.coverage_target:.0f}%, an estimate: --curve verifies it): {s.spec}"
        )
    click.echo(f"size {human_bytes(s.bytes_before)} -> about {human_bytes(s.bytes)}")
    click.echo(f"  {s.command}")
    if recipes:
        print_recipes(analysis.family, s.blocks, analysis.input_ranks)
    else:
        click.echo(
            "retrain  the settings that train only these blocks are in ranking.json "
            "('recipes'); analyze --recipes prints them"
        )


def print_analysis(analysis: Analysis, *, recipes: bool = False) -> None:
    """What ``analyze`` prints of a finished analysis: rankings, effects, curve, suggestion."""
    print_ranking(analysis)
    print_effects(analysis)
    print_curve(analysis)
    print_suggestion(analysis, recipes=recipes)
    click.echo(f"\nreport   {analysis.out_dir / 'report.html'}")


def print_renders(r: RenderStats, seconds: float, shard: Shard | None) -> None:
    who = "" if shard is None else f"process {shard.index + 1} of {shard.count}: "
    click.echo(
        f"{who}rendered {r.rendered} images ({r.cached} cached of {r.planned}) in {seconds:.1f} s"
    )
    if r.damaged:
        click.echo(
            f"note: {who}{r.damaged} cached image{'s were' if r.damaged != 1 else ' was'} "
            "damaged or had no record and rendered again",
            err=True,
        )


def print_verification(result: VerifyResult) -> None:
    click.echo(f"kept blocks  {format_block_spec(result.kept_blocks) or 'none'}")
    click.echo("kept share = 1 - d(slim, full) / d(base, full); " + result.criterion.describe())
    click.echo(
        f"{'prompt':>6} {'seed':>6} {'effect MSE':>10} {'kept MSE':>9} {'kept SSIM':>9} "
        f"{'SSIM':>8}  verdict"
    )
    for i in result.images:
        verdict = ("pass" if i.passed else "FAIL") if i.measurable else "no effect"
        click.echo(
            f"{i.prompt:>6} {i.seed:>6} {i.effect['mse']:>10.2f} "
            f"{share(i.kept.get('mse')):>9} {share(i.kept.get('ssim')):>9} "
            f"{i.ssim:>8.4f}  {verdict}"
        )
    if not result.measurable:
        click.echo("overall: the LoRA shows no measurable effect on some image: NOT VERIFIED")
        return
    click.echo(
        f"overall: worst share of the effect kept {share(result.kept_share)} "
        f"(min {100 * result.min_kept:g}%), worst SSIM {result.worst_ssim:.4f}: "
        f"{'PASS' if result.passed else 'FAIL'}"
    )


def print_effects(analysis: Analysis) -> None:
    click.echo("\nthe LoRA's effect per image (base vs full):")
    prompts = analysis.settings.render.prompts
    for e in analysis.effects:
        click.echo(
            f"  prompt {e['prompt']} seed {e['seed']}: MSE {e['mse']:.2f}, "
            f"1-SSIM {e['ssim_distance']:.4f}  ({prompts[e['prompt']][:40]!r})"
        )
    for warning in analysis.warnings:
        click.echo(f"warning: {warning}", err=True)
    for note in analysis.notes:
        click.echo(f"note: {note}", err=True)


def print_curve(analysis: Analysis) -> None:
    if not analysis.curve:
        return
    click.echo(
        "\npruning curve (top-k blocks: worst share of the effect kept, MSE / 1-SSIM, size):"
    )
    for p in analysis.curve:
        mark = "" if p.rendered else "  (by definition)"
        click.echo(
            f"  k={p.k:>3}  {share(p.worst.get('mse')):>7} / {share(p.worst.get('ssim')):>7}"
            f"  {human_bytes(p.bytes):>10}  {'pass' if p.passed else '-'}{mark}"
        )
    click.echo(f"curve    {analysis.out_dir / 'pruning_curve.png'}")


def print_kept_as_is(kept: dict[str, str], shown: int = 3) -> None:
    """The modules a resize left as they were, one line per reason (not one per module)."""
    by_reason: dict[str, list[str]] = {}
    for stem, why in kept.items():
        by_reason.setdefault(why, []).append(stem)
    for why, stems in by_reason.items():
        more = f" and {len(stems) - shown} more" if len(stems) > shown else ""
        noun = "module" if len(stems) == 1 else "modules"
        click.echo(f"kept as is  {len(stems)} {noun} ({why}): {', '.join(stems[:shown])}{more}")
