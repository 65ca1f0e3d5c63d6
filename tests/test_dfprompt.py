"""DF-Prompt grammar, PAE schedule and the A1111 rendering (pure Python, no torch)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from promptist_core import dfprompt as df
from promptist_core.cli import main
from promptist_core.dfprompt import (
    DFPromptError,
    Modifier,
    format_prompt,
    parse,
    percent_schedule,
    schedule,
    to_a1111,
    to_plain,
)

EXAMPLE = "a red horse on the grass, [anime:0-1:1.5], [detailed:0.85-1:1]"


# -- grammar ---------------------------------------------------------------------------------------------

def test_parse_splits_plain_text_and_modifiers():
    p = parse(EXAMPLE)
    assert p.parts == ("a red horse on the grass, ", Modifier("anime", 0.0, 1.0, 1.5), ", ",
                       Modifier("detailed", 0.85, 1.0, 1.0))


def test_a1111_attention_and_escaped_brackets_pass_through_untouched():
    text = r"(masterpiece:1.2), a \[boxed\] cat, [(fluffy:1.1):0.5-1:1.25]"
    p = parse(text)
    assert p.parts[0] == r"(masterpiece:1.2), a \[boxed\] cat, "
    assert p.parts[1] == Modifier("(fluffy:1.1)", 0.5, 1.0, 1.25)  # colons inside the text are allowed
    assert to_plain(p) == "(masterpiece:1.2), a [boxed] cat, (fluffy:1.1)"


def test_host_brackets_leave_the_webuis_own_prompt_editing_beside_df_blocks():
    text = "a [cat:dog:10] in [[snow]], x], [detailed:0.5-1:1.25]"
    p = parse(text, host_brackets=True)
    assert p.parts == ("a [cat:dog:10] in [[snow]], x], ", Modifier("detailed", 0.5, 1.0, 1.25))
    assert to_a1111(p, 20) == "a [cat:dog:10] in [[snow]], x][, (detailed:1.25)::9]"
    with pytest.raises(DFPromptError, match="column 22: expected a range within 0-1, got 1.5"):
        parse("a [cat:dog:5] [x:0.5-1.5:1]", host_brackets=True)  # DF-shaped blocks are still checked
    with pytest.raises(DFPromptError, match="column 8: expected a range like 0.5-1"):
        parse(text)  # strict by default


def test_format_normalizes_numbers_and_spaces_inside_blocks_only():
    assert format_prompt("a  cat , [ anime : .5 - 1.0 : 1.50 ]") == "a  cat , [anime:0.5-1:1.5]"


@pytest.mark.parametrize(("text", "column", "expected"), [
    ("a red horse, [anime:x:1.5]", 21, "expected a range like 0.5-1"),
    ("a red horse, [anime:0-1.5:1]", 23, "expected a range within 0-1, got 1.5"),
    ("a red horse, [anime:0.8-0.5:1]", 21, "expected a range with start <= end"),
    ("a red horse, [anime:0-1:0]", 25, "expected a weight > 0, got 0"),
    ("a red horse, [anime:0-1:-1]", 25, "expected a weight like 1.25"),
    ("a red horse, [anime:0-1:heavy]", 25, "expected a weight like 1.25"),
    ("a red horse, [anime:0-1]", 24, "expected a block like [text:0.5-1:1.25]"),
    ("a red horse, [anime", 14, "expected a ']' closing this block"),
    ("a red horse], x", 12, "expected no ']' outside a block"),
    ("a [red [anime:0-1:1]", 8, "expected ']' before another '['"),
    ("a [ :0-1:1]", 4, "expected modifier text"),
])
def test_invalid_prompts_name_the_column_and_what_was_expected(text, column, expected):
    with pytest.raises(DFPromptError) as info:
        parse(text)
    assert info.value.column == column
    assert str(info.value).startswith(f"column {column}: {expected}")
    assert isinstance(info.value, ValueError)


def test_error_message_points_at_the_bad_character():
    with pytest.raises(DFPromptError) as info:
        parse("a red horse, [anime:x:1.5]")
    _, snippet, caret = str(info.value).splitlines()
    assert snippet.strip() == "a red horse, [anime:x:1.5]"
    assert snippet[caret.index("^")] == "x"


numbers = st.floats(min_value=0, max_value=1, allow_nan=False)
plain_text = st.lists(st.sampled_from(list("ab ,.()-:") + ["\\[", "\\]", "\\\\"]), max_size=12).map("".join)


@st.composite
def modifiers(draw) -> Modifier:
    a, b = sorted((draw(numbers), draw(numbers)))
    w = draw(st.floats(min_value=1e-3, max_value=4, allow_nan=False))
    text = draw(st.lists(st.sampled_from(list("xyz ()-:.") + ["\\[", "\\]"]), min_size=1, max_size=10)
                .map(lambda s: "".join(s).strip()).filter(bool))
    return Modifier(text, a, b, w)


@st.composite
def prompts(draw) -> df.DFPrompt:
    parts = []
    for item in draw(st.lists(st.one_of(plain_text.map(lambda s: ("t", s)), modifiers()), max_size=6)):
        if isinstance(item, Modifier):
            parts.append(item)
        elif item[1]:
            if parts and isinstance(parts[-1], str):
                parts[-1] += item[1]
            else:
                parts.append(item[1])
    return df.DFPrompt(tuple(parts))


@settings(max_examples=150, deadline=None)
@given(prompts())
def test_parse_of_format_gives_back_the_same_prompt(prompt):
    assert parse(prompt.format()) == prompt


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab [],:.-0123456789\\ ()")), max_size=30))
def test_format_of_parse_is_the_normalized_text_or_a_positioned_error(text):
    try:
        normalized = format_prompt(text)
    except DFPromptError as e:
        assert 1 <= e.column <= len(text) + 1
        return
    assert format_prompt(normalized) == normalized
    assert parse(normalized) == parse(text)
    # Outside the blocks nothing changes.
    assert [p for p in parse(text).parts if isinstance(p, str)] == \
           [p for p in parse(normalized).parts if isinstance(p, str)]


# -- schedule --------------------------------------------------------------------------------------------

def pae_active(a: float, b: float, n: int, i: int) -> bool:
    """PAE's rule, written out as the issue states it."""
    return n - int(b * n) <= i <= n - int(a * n) - 1


RANGES = [(0.0, 0.5), (0.0, 1.0), (0.5, 1.0), (0.85, 1.0), (0.2, 0.7), (0.0, 0.1), (0.3, 0.3), (0.95, 1.0),
          (0.0, 0.05), (0.33, 0.66), (1.0, 1.0), (0.0, 0.0)]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 10, 13, 20, 25, 30, 50, 77, 100])
def test_schedule_follows_pae_rule_for_every_step(n):
    mods = [Modifier(f"m{k}", a, b, 1.0 + (k + 1) / 8) for k, (a, b) in enumerate(RANGES)]
    prompt = df.DFPrompt(tuple(x for m in mods for x in ("x, ", m)))
    segments = schedule(prompt, n)
    assert segments[0].first_step == 0 and segments[-1].last_step == n - 1
    for prev, seg in zip(segments, segments[1:], strict=False):
        assert seg.first_step == prev.last_step + 1 and seg.active != prev.active  # merged maximally
    for seg in segments:
        for i in range(seg.first_step, seg.last_step + 1):
            assert [m for m in mods if pae_active(m.start, m.end, n, i)] == list(seg.active)
        # Inactive modifiers are gone from the text; active ones carry their weight.
        for m in mods:
            assert ((m.text, m.weight) in seg.chunks) == (m in seg.active)


def test_pae_ranges_cover_first_half_second_half_and_all_steps():
    segments = schedule("cat, [a:0-1:1.5], [b:0.5-1:1.25], [c:0-0.5:0.75]", 20)
    assert [(s.first_step, s.last_step, s.weighted_text()) for s in segments] == [
        (0, 9, "cat, (a:1.5), (b:1.25)"),
        (10, 19, "cat, (a:1.5), (c:0.75)"),
    ]
    assert segments[1].text == "cat, a, c"


@pytest.mark.parametrize(("prompt", "texts"), [
    ("a red horse, [anime:0-0.5:1.5], [detailed:0.5-1:1], sharp",
     ["a red horse, detailed, sharp", "a red horse, anime, sharp"]),  # in the middle: the ", " before it
    ("[anime:0-0.5:1.5], a horse, [detailed:0.5-1:1]", ["a horse, detailed", "anime, a horse"]),  # first, last
    ("cat, [a:0-0.5:1], [b:0-0.5:1], [c:0.5-1:1]", ["cat, c", "cat, a, b"]),  # two in a row
    ("a photo of [a cat:0-0.5:1] on a mat", ["a photo of on a mat", "a photo of a cat on a mat"]),  # no commas
    ("[x:0-0.5:1] [y:0.5-1:1]", ["y", "x"]),
])
def test_a_removed_block_takes_one_separator_with_it(prompt, texts):
    assert [s.text for s in schedule(prompt, 10)] == texts
    assert [s.text for s in percent_schedule(prompt)] == texts


def test_percent_schedule_maps_a_range_a_b_to_sampling_percents_1_minus_b_to_1_minus_a():
    mods = [Modifier(f"m{k}", a, b, 1.0 + (k + 1) / 8) for k, (a, b) in enumerate(RANGES)]
    prompt = df.DFPrompt(tuple(x for m in mods for x in ("x, ", m)))
    segments = percent_schedule(prompt)
    assert segments[0].start_percent == 0.0 and segments[-1].end_percent == 1.0
    for prev, seg in zip(segments, segments[1:], strict=False):
        assert seg.start_percent == prev.end_percent and seg.active != prev.active  # no gaps, merged maximally
    for seg in segments:
        assert seg.start_percent < seg.end_percent
        middle = (seg.start_percent + seg.end_percent) / 2
        assert [m for m in mods if 1 - m.end < middle < 1 - m.start] == list(seg.active)
        for m in mods:
            assert ((m.text, m.weight) in seg.chunks) == (m in seg.active)
    detailed = percent_schedule(EXAMPLE)
    assert [(s.start_percent, s.end_percent, s.weighted_text()) for s in detailed] == [
        (0.0, 0.15, "a red horse on the grass, (anime:1.5), detailed"),
        (0.15, 1.0, "a red horse on the grass, (anime:1.5)"),
    ]


def test_schedule_rejects_a_bad_step_count():
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1, got 0"):
        schedule("cat", 0)


def test_step_counts_are_bounded_in_every_renderer():
    assert len(df.step_texts("cat, [a:0.5-1:1.5]", df.MAX_STEPS)) == df.MAX_STEPS == 10_000
    for render in (schedule, df.step_texts, to_a1111, lambda p, n: df.comfy_percent(1, n)):
        with pytest.raises(ValueError, match="num_steps must be at most 10000 .*got 10001"):
            render("cat, [a:0.5-1:1.5]", df.MAX_STEPS + 1)


# -- A1111 rendering -------------------------------------------------------------------------------------

def test_a1111_rendering_of_the_pae_ranges_with_known_steps():
    assert to_a1111("cat, [detailed:0.5-1:1.25]", 20) == "cat[, (detailed:1.25)::9]"  # the ", " goes with the block
    assert to_a1111("cat, [anime:0-0.5:1.5]", 20) == "cat[, (anime:1.5):9]"
    assert to_a1111("cat, [anime:0-1:1.5]", 20) == "cat, (anime:1.5)"
    assert to_a1111("cat, [anime:0-1:1]", 20) == "cat, anime"


def test_a1111_rendering_of_general_ranges_nests_start_and_end():
    assert to_a1111("cat, [x:0.2-0.7:0.5]", 20) == "cat[[, (x:0.5):5]::15]"  # steps 6..15
    assert to_a1111("cat, [x:0.3-0.3:2]", 20) == "cat"  # never active
    assert to_a1111(EXAMPLE, 20) == "a red horse on the grass, (anime:1.5)[, detailed::2]"


def test_a1111_rendering_without_steps_uses_fractions():
    assert to_a1111("cat, [detailed:0.5-1:1.25], [x:0.2-0.7:0.5]") == \
        "cat[, (detailed:1.25)::0.5][[, (x:0.5):0.3]::0.8]"


def test_a1111_hires_rendering_counts_after_the_first_pass():
    assert to_a1111("cat, [detailed:0.5-1:1.25]", 10, first_pass_steps=20) == "cat[, (detailed:1.25)::24]"
    assert to_a1111("cat, [detailed:0.5-1:1.25]", first_pass_steps=20) == "cat[, (detailed:1.25)::1.5]"


@pytest.fixture(scope="module")
def webui_schedules(webui_prompt_parser):
    """The webui's own prompt scheduler (A1111 v1.10.1), when a checkout and lark are available."""
    return webui_prompt_parser.get_learned_conditioning_prompt_schedules


def webui_step_prompts(get_schedules, text: str, n: int, hires_n: int | None = None) -> list[str]:
    """The prompt the webui uses at each 0-based step: the first entry with step <= end_at_step."""
    steps = hires_n or n
    entries = get_schedules([text], n, hires_n)[0]
    return [next(t for end, t in entries if i <= end) for i in range(steps)]


def expected_webui_prompts(text: str, n: int) -> list[str]:
    """PAE's per-step prompts, except that the webui cannot tell step 0 from step 1 (see to_a1111)."""
    pae = df.step_texts(text, n, style="a1111")
    return [pae[max(i, 1)] if n > 1 else pae[i] for i in range(n)]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 20, 50])
def test_webui_parser_schedules_the_rendering_exactly_as_pae(webui_schedules, n):
    for a, b in RANGES:
        text = rf"(best:1.1) cat \[x\], [detailed:{a}-{b}:1.25], [anime:0-0.5:1.5], [sharp:0.5-1:0.75]"
        rendered = to_a1111(text, n)
        assert webui_step_prompts(webui_schedules, rendered, n) == expected_webui_prompts(text, n), rendered
        if n - int(b * n) != 1 and n - int(a * n) != 1 and n > 2:  # no boundary between steps 0 and 1
            assert webui_step_prompts(webui_schedules, rendered, n) == df.step_texts(text, n)


@pytest.mark.parametrize(("base", "hires"), [(20, 10), (30, 15), (20, 20), (7, 3)])
def test_webui_parser_schedules_hires_renderings_with_the_second_pass_steps(webui_schedules, base, hires):
    for a, b in RANGES:
        text = f"cat, [detailed:{a}-{b}:1.25], [anime:0-0.5:1.5]"
        rendered = to_a1111(text, hires, first_pass_steps=base)
        assert webui_step_prompts(webui_schedules, rendered, base, hires) == expected_webui_prompts(text, hires)


def test_webui_parser_is_one_step_off_with_fractions(webui_schedules):
    text = "cat, [detailed:0.5-1:1.25]"
    got = webui_step_prompts(webui_schedules, to_a1111(text), 20)
    assert got.count("cat, (detailed:1.25)") == 11  # PAE: 10 steps; hence integer steps when N is known
    assert df.step_texts(text, 20).count("cat, (detailed:1.25)") == 10


# -- CLI -------------------------------------------------------------------------------------------------

def test_cli_prints_the_schedule_a1111_and_json(capsys):
    assert main(["dfprompt", "cat, [detailed:0.5-1:1.25]", "--steps", "20", "--format", "a1111"]) == 0
    assert capsys.readouterr().out.strip() == "cat[, (detailed:1.25)::9]"
    assert main(["dfprompt", "cat, [detailed:0.5-1:1.25]", "--steps", "20", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(s["first_step"], s["last_step"], s["weighted_text"]) for s in data["segments"]] == [
        (0, 9, "cat, (detailed:1.25)"), (10, 19, "cat")]
    assert main(["dfprompt", "cat, [detailed:0.5-1:1.25]", "--steps", "20"]) == 0
    assert capsys.readouterr().out.splitlines() == ["steps 0-9: cat, (detailed:1.25)", "steps 10-19: cat"]


@pytest.mark.parametrize("fmt", ["schedule", "a1111", "json"])
def test_cli_refuses_an_absurd_step_count_at_once(fmt):
    # The command ran for over 10 minutes; the timeout only keeps a regression from hanging CI.
    import subprocess
    import sys

    from conftest import ROOT

    done = subprocess.run([sys.executable, "-m", "promptist_core", "dfprompt", "a horse, [anime:0-1:1.5]",
                           "--steps", "1000000000", "--format", fmt], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert done.returncode == 2
    assert done.stderr == "error: --steps must be between 1 and 10000; got 1000000000\n"


def test_cli_reports_a_parse_error_in_one_line_with_exit_code_2(capsys):
    assert main(["dfprompt", "cat, [detailed:1-0.5:1]", "--steps", "20"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: column 16: expected a range with start <= end, got 1-0.5 (write 0.5-1)"


@pytest.mark.parametrize("text, column, expected", [
    ("a red horse, [anime:0-1:abc]", 25, "expected a weight"),
    ("a red horse, [anime:0-1:]", 25, "expected a weight"),
    ("a red horse, [anime:0-1]", 24, "expected a block like"),
    ("a red horse, [anime:0-x:1]", 21, "expected a range like"),
    ("a red horse, [anime:1-0.5:1.5]", 21, "start <= end"),
])
def test_host_brackets_report_blocks_that_almost_parse(text, column, expected):
    """With the webui's brackets left to it, a DF block with a mistake is still an error, not host text."""
    assert df.has_dfprompt(text)
    with pytest.raises(df.DFPromptError, match=expected) as e:
        df.parse(text, host_brackets=True)
    assert e.value.column == column


@pytest.mark.parametrize("text", ["a [cat:dog:10]", "a [photo:2-3 people:0.5]", "[x::0.5] [a|b] [word]",
                                  "[(x:1.2)::9]", "[cat:dog:0.5]"])
def test_host_brackets_still_leave_the_webuis_own_editing_alone(text):
    assert not df.has_dfprompt(text)
    assert df.parse(text, host_brackets=True).modifiers == ()
