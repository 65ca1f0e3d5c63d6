"""Negative captions for TPO: a caption edited so that it no longer describes its image.

TPO's four kinds of edit (TRAINERS.md §5.1): content (swap an object within its category, change a
count, add or remove an object), attribute (colour, material, texture, size, style), spatial
(left/right, above/below, inside/outside, in front of/behind, on top of/under, and motion such as
sitting/standing) and context (scene, time of day, weather, season, lighting, medium).

Three editors share one call, `editor(captions, count) -> [[Negative, ...] per caption]`:
- `rules` (default): offline word tables; every edit is word-boundary aware, keeps the case of the
  word it replaces, keeps singular/plural and fixes "a"/"an" before what it wrote. Seeded per
  caption, so a caption gets the same negatives whatever else is in the batch.
- `llm:<local causal LM folder>`: the pairs rewrite hook with an instruction naming the four kinds
  and the kind wanted; greedy, the first line of the answer.
- `command:<program>`: the pairs rewrite hook's contract, one caption per line in, one negative per
  line out (optionally `type<TAB>negative`); a caption is sent `count` times.

Every editor drops negatives that equal the caption after normalising case, whitespace and
punctuation, and repeats; what it dropped is counted in `editor.dropped`.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..policy.corpus import normalize_prompt
from .data import EDIT_TYPES, NEGATIVE_TYPES, Negative, caption_key

# --- words -----------------------------------------------------------------------------------------

# Objects, by category (singular): a content edit swaps within a category, so "a dog on a couch"
# becomes "a cat on a couch", not "a pizza on a couch".
OBJECTS: dict[str, tuple[str, ...]] = {
    "animal": ("cat", "dog", "horse", "cow", "sheep", "bird", "elephant", "giraffe", "zebra", "bear", "teddy bear",
               "duck", "goat", "pig", "rabbit", "fox", "tiger", "lion", "monkey", "deer", "squirrel", "owl",
               "pigeon", "seagull", "puppy", "kitten"),
    "person": ("man", "woman", "boy", "girl", "child", "baby", "lady", "guy", "person", "player", "skier",
               "surfer", "skateboarder", "chef", "soldier", "astronaut", "robot"),
    "vehicle": ("car", "bus", "truck", "train", "motorcycle", "bicycle", "bike", "boat", "airplane", "plane",
                "jet", "van", "taxi", "tractor", "scooter", "ship", "helicopter"),
    "food": ("apple", "banana", "orange", "pizza", "sandwich", "cake", "donut", "doughnut", "hot dog",
             "broccoli", "carrot", "burger", "salad", "cookie", "strawberry", "tomato", "egg", "pie",
             "lemon", "cupcake"),
    "furniture": ("chair", "couch", "sofa", "bed", "table", "bench", "desk", "stool", "shelf", "cabinet"),
    "tableware": ("cup", "mug", "bowl", "plate", "fork", "knife", "spoon", "glass", "bottle", "vase",
                  "wine glass", "teapot", "pot", "pan"),
    "device": ("laptop", "phone", "cell phone", "computer", "keyboard", "mouse", "remote", "television", "tv",
               "monitor", "camera", "clock", "lamp", "book"),
    "sports gear": ("frisbee", "ball", "kite", "skateboard", "surfboard", "snowboard", "tennis racket",
                    "baseball bat", "baseball glove", "umbrella", "backpack", "suitcase", "handbag"),
    "plant": ("tree", "flower", "rose", "plant", "bush", "cactus", "palm tree", "sunflower"),
    "building": ("house", "castle", "tower", "church", "bridge", "lighthouse", "barn", "cabin", "building",
                 "skyscraper", "tent"),
}
_IRREGULAR = {"man": "men", "woman": "women", "child": "children", "person": "people", "mouse": "mice",
              "knife": "knives", "shelf": "shelves", "goose": "geese", "foot": "feet", "tooth": "teeth",
              "leaf": "leaves", "wolf": "wolves", "cactus": "cacti", "sheep": "sheep", "deer": "deer",
              "fish": "fish", "lady": "ladies", "baby": "babies", "puppy": "puppies", "strawberry": "strawberries",
              "tomato": "tomatoes", "bus": "buses", "glass": "glasses", "wine glass": "wine glasses"}
_INVARIANT = {"sheep", "deer", "fish"}

# Attribute words: a group holds words that exclude each other; an edit picks another of the group.
ATTRIBUTES: dict[str, tuple[tuple[str, ...], ...]] = {
    "colour": (("red", "blue", "green", "yellow", "black", "white", "purple", "pink", "brown", "gray", "grey",
                "silver", "golden", "gold"),),
    "material": (("wooden", "metal", "metallic", "glass", "plastic", "stone", "brick", "leather", "marble",
                  "paper", "ceramic", "concrete", "steel", "wicker", "velvet"),),
    "texture": (("smooth", "rough", "fluffy", "furry", "shiny", "glossy", "rusty", "striped", "spotted",
                 "wrinkled", "muddy", "polished", "checkered"),),
    "size": (("large", "small"), ("big", "little"), ("huge", "tiny"), ("tall", "short"), ("long", "short"),
             ("wide", "narrow"), ("thick", "thin"), ("giant", "miniature"), ("young", "old"), ("new", "old"),
             ("clean", "dirty"), ("open", "closed")),
    "style": (("realistic", "cartoonish", "abstract", "minimalist", "baroque", "cyberpunk", "steampunk",
               "impressionist", "surreal", "vintage", "futuristic", "gothic", "anime", "pixel art",
               "art deco", "art nouveau", "photorealistic"),),
}
# Words that are never swapped for each other although they share a group.
_SYNONYMS = ({"gray", "grey"}, {"gold", "golden"}, {"metal", "metallic", "steel"})
_INSERTED_ADJECTIVES = ("red", "blue", "green", "yellow", "black", "white", "wooden", "metal", "giant", "tiny",
                        "striped", "glass")
_INSERTED_PERSON_ADJECTIVES = ("young", "old", "tall", "bald", "blond", "bearded", "smiling", "crying")

# Relations and motion: each pair is flipped both ways.
SPATIAL: tuple[tuple[str, str], ...] = (
    ("left", "right"), ("above", "below"), ("inside", "outside"), ("in front of", "behind"),
    ("on top of", "underneath"), ("over", "under"), ("upstairs", "downstairs"), ("up", "down"),
    ("into", "out of"), ("towards", "away from"), ("toward", "away from"), ("near", "far from"),
    ("next to", "far from"), ("beside", "far from"), ("top", "bottom"), ("indoors", "outdoors"),
    ("ascending", "descending"), ("uphill", "downhill"), ("upside down", "upright"), ("in the air", "on the ground"),
)
# "on a table" -> "under a table": only before a determiner, so "on display" and "turned on" stay.
_ON = re.compile(r"\b(on)(?=\s+(?:a|an|the|his|her|their|its|some|two|three|several)\b)", re.IGNORECASE)
_PLACEMENTS = ("upside down", "in the top left corner", "on the far right", "lying on its side", "in the background",
               "hanging from the ceiling", "underneath everything else", "floating in the air")
_VIEWS = ("seen from below", "seen from behind", "viewed from above", "upside down", "reflected in a mirror")
MOTION: tuple[tuple[str, str], ...] = (
    ("sitting", "standing"), ("sits", "stands"), ("lying", "standing"), ("laying", "standing"),
    ("walking", "running"), ("walks", "runs"), ("parked", "driving"), ("flying", "landing"),
    ("jumping", "sitting"), ("climbing", "descending"), ("leaning", "standing"), ("entering", "leaving"),
    ("facing", "turned away from"), ("holding", "dropping"), ("floating", "sinking"), ("stacked", "scattered"),
)

CONTEXT: dict[str, tuple[tuple[str, ...], ...]] = {
    "time of day": (("morning", "afternoon", "evening", "night", "midnight", "sunset", "sunrise", "dusk", "dawn",
                     "noon", "twilight"), ("daytime", "nighttime"), ("at night", "during the day")),
    "weather": (("sunny", "rainy", "snowy", "cloudy", "foggy", "stormy", "misty", "overcast", "windy"),
                ("rain", "snow", "fog", "storm", "sunshine")),
    "season": (("spring", "summer", "autumn", "winter"),),
    "lighting": (("bright", "dark", "dim", "sunlit", "moonlit", "candlelit", "neon-lit", "shadowy"),
                 ("cinematic lighting", "neon lighting", "studio lighting", "natural lighting", "dramatic lighting",
                  "soft lighting", "golden hour lighting", "backlighting")),
    "scene": (("kitchen", "bathroom", "bedroom", "living room", "office", "classroom", "restaurant", "garage",
               "library", "hallway"),
              ("beach", "desert", "forest", "field", "park", "city", "street", "mountain", "lake", "river", "farm",
               "garden", "jungle", "meadow", "harbor", "snowfield", "highway", "village", "airport", "parking lot"),
              ("indoor", "outdoor"), ("urban", "rural")),
    "medium": (("photo", "photograph", "painting", "drawing", "sketch", "watercolor", "oil painting", "illustration",
                "render", "3d render", "cartoon", "comic", "poster"),),
}
_PLACE_NOUNS = {w for g in CONTEXT["scene"][:2] for w in g}
# Added at the end when a caption names no context at all; skipped when the caption already names
# that kind of context.
_ADDED_CONTEXT = (("at night", "time of day"), ("at sunset", "time of day"), ("in the rain", "weather"),
                  ("in the snow", "weather"), ("on a foggy morning", "weather"), ("in a desert", "scene"),
                  ("underwater", "scene"), ("in outer space", "scene"), ("in winter", "season"),
                  ("under neon lights", "lighting"))

NUMBERS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "twelve", "dozens of")
_DETERMINERS = {"a", "an", "the", "one", "this", "that", "his", "her", "their", "its", "my", "some"}
_SINGULAR_CUES = {"a", "an", "one", "single", "each", "every", "this", "that", "lone"}
_AGREEMENT = {"is": "are", "has": "have", "was": "were", "sits": "sit", "stands": "stand", "looks": "look"}


# --- case, number and articles ---------------------------------------------------------------------

def match_case(source: str, replacement: str) -> str:
    """`replacement` written in the case of `source` (lower, Capitalised or UPPER)."""
    if len(source) > 1 and source.isupper():
        return replacement.upper()
    if source[:1].isupper():
        return replacement[:1].upper() + replacement[1:]
    return replacement


def plural(noun: str) -> str:
    """The plural of a (possibly two-word) noun: "hot dog" -> "hot dogs", "knife" -> "knives"."""
    if noun in _IRREGULAR:
        return _IRREGULAR[noun]
    head, _, last = noun.rpartition(" ")
    if last in _IRREGULAR:
        return f"{head} {_IRREGULAR[last]}".strip()
    if re.search(r"(s|x|z|ch|sh)$", last):
        last += "es"
    elif re.search(r"[^aeiou]y$", last):
        last = last[:-1] + "ies"
    else:
        last += "s"
    return f"{head} {last}".strip()


def article_for(word: str) -> str:
    """"a" or "an" before `word`, by its sound as far as spelling tells."""
    w = word.lower()
    if re.match(r"(hour|honest|honou?r|heir)", w) or re.match(r"(8|11|18)\b", w):
        return "an"
    if re.match(r"(uni|use|usu|uten|ure|uro|eu|one|once|ewe)", w):
        return "a"
    return "an" if w[:1] in "aeiou" else "a"


_ARTICLE_BEFORE = re.compile(r"\b(a|an)(\s+)$", re.IGNORECASE)


def _fix_article(text: str, at: int) -> str:
    """Fix an "a"/"an" just before position `at` for the word that now starts there."""
    m = _ARTICLE_BEFORE.search(text, 0, at)
    word = re.match(r"[\w'-]+", text[at:])
    if not m or not word:
        return text
    wanted = match_case(m.group(1), article_for(word.group(0)))
    return text[:m.start(1)] + wanted + text[m.end(1):]


def _splice(text: str, start: int, end: int, new: str) -> str:
    """`text` with [start:end] replaced by `new`, the article before it fixed."""
    return _fix_article(text[:start] + new + text[end:], start)


def _alternation(words) -> re.Pattern:
    """Whole words or phrases, longest first, case-insensitive; spaces match any whitespace."""
    parts = [r"\s+".join(re.escape(p) for p in w.split()) for w in sorted(set(words), key=len, reverse=True)]
    return re.compile(r"(?<![\w-])(?:" + "|".join(parts) + r")(?![\w-])", re.IGNORECASE)


# --- word tables -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Form:
    group: int  # the group (category) it belongs to
    base: str  # singular (nouns) or the word itself
    number: str  # "sg", "pl", "either" (sheep) or "" (not a noun)


# Words that may follow a noun that heads its phrase ("a field in ...", "the kitchen."); any other
# word makes it a modifier ("street sign", "kitchen sink") that a scene swap leaves alone.
_AFTER_HEAD = {"and", "or", "with", "in", "on", "at", "of", "near", "by", "next", "behind", "under", "while", "that",
               "where", "is", "are", "was", "were", "has", "have", "filled", "full", "covered", "during",
               "from", "to", "for", "as", "scene", "setting", "background", "area", "view", "outside", "inside",
               "beside", "across", "along", "through", "into", "lit", "which", "who", "there", "some"}


class SwapTable:
    """Words in exclusive groups; `swaps(text)` lists every (start, end, replacement) it can make."""

    def __init__(self, groups: Sequence[Sequence[str]], *, nouns: bool = False, heads_only: bool = False):
        self.heads_only = heads_only
        self.groups = [tuple(g) for g in groups]
        self.forms: dict[str, _Form] = {}
        for i, group in enumerate(self.groups):
            for word in group:
                if nouns:
                    number = "either" if word in _INVARIANT else "sg"
                    self.forms.setdefault(plural(word), _Form(i, word, "pl" if number == "sg" else number))
                    self.forms[word] = _Form(i, word, number)
                else:
                    self.forms.setdefault(word, _Form(i, word, ""))
        self.pattern = _alternation(self.forms)

    def find(self, text: str) -> list[tuple[re.Match, _Form]]:
        return [(m, self.forms[" ".join(m.group(0).lower().split())]) for m in self.pattern.finditer(text)]

    def swaps(self, text: str, rng: random.Random) -> list[tuple[int, int, str]]:
        out = []
        present = {f.base for _, f in self.find(text)}
        for m, form in self.find(text):
            following = re.match(r"\s*([\w']+)", text[m.end():])
            if self.heads_only and following and following.group(1).lower() not in _AFTER_HEAD:
                continue
            choices = [w for w in self.groups[form.group]
                       if w != form.base and w not in present and not _synonyms(w, form.base)]
            if not choices:
                continue
            new = rng.choice(choices)
            number = form.number if form.number != "either" else _number_before(text, m.start())
            if number == "pl":
                new = plural(new)
            out.append((m.start(), m.end(), match_case(m.group(0), new)))
        return out


def _synonyms(a: str, b: str) -> bool:
    return any(a in s and b in s for s in _SYNONYMS)


def _number_before(text: str, at: int) -> str:
    before = re.findall(r"[\w']+", text[:at].lower())
    return "sg" if before and before[-1] in _SINGULAR_CUES else "pl"


def _flip_table(pairs: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    table: dict[str, list[str]] = {}
    for a, b in pairs:
        table.setdefault(a, []).append(b)
        table.setdefault(b, []).append(a)
    return table


_OBJECTS = SwapTable(list(OBJECTS.values()), nouns=True)
_ATTRIBUTES = {kind: SwapTable(groups) for kind, groups in ATTRIBUTES.items()}
_CONTEXT = {kind: SwapTable(groups, nouns=(kind == "scene"), heads_only=(kind == "scene"))
            for kind, groups in CONTEXT.items()}
_SPATIAL = _flip_table(SPATIAL)
_MOTION = _flip_table(MOTION)
_SPATIAL_PATTERN = _alternation(_SPATIAL)
_MOTION_PATTERN = _alternation(_MOTION)
_NUMBER_PATTERN = _alternation((*NUMBERS, "a pair of", "a couple of", "a few", "several", "many"))
_DIGITS = re.compile(r"(?<![\w.,/:])\d{1,3}(?![\w/:]|[.,]\d)")
_CONTEXT_WORDS = {kind: table.pattern for kind, table in _CONTEXT.items()}


# --- the four kinds of edit ------------------------------------------------------------------------

Edit = tuple[int, int, str]  # replace text[start:end] by the string


def content_edits(text: str, rng: random.Random) -> list[Edit]:
    """Swap an object for another of its category, change a count, add an object, remove one."""
    edits = _OBJECTS.swaps(text, rng)
    edits += _count_edits(text, rng)
    objects = _OBJECTS.find(text)
    present = {f.base for _, f in objects}
    heads = [(m, f) for m, f in objects if not text.startswith("'", m.end())]  # not "the woman's hat"
    extra = rng.choice([w for g in OBJECTS.values() for w in g if w not in present])
    if heads:  # add: "a cat on a couch" -> "a cat and a dog on a couch"; "a cat is" -> "... are"
        m, _form = heads[0]
        after, tail = _agreement(text, m.end())
        edits.append((m.end(), after, f" and {article_for(extra)} {extra}" + tail))
    else:  # nothing we know: add to the main content (the first comma item)
        end = len(re.split(r"[,.;]", text.rstrip(" .!;,"), maxsplit=1)[0])
        edits.append((end, end, f" and {article_for(extra)} {extra}"))
    for m, _form in objects[1:] if len(objects) > 1 else ():  # remove: "... with a lamp" -> "..."
        clause = re.search(r"(?:,\s*|\s+)(?:and|with)\s+(?:(?:a|an|the|some|two|three|\w+)\s+){0,2}$",
                           text[:m.start()], re.IGNORECASE)
        if (clause and not re.search(r"\b(?:and|with)\b.*\b(?:and|with)\b", clause.group(0), re.IGNORECASE)
                and not re.search(r"ed$", text[:clause.start()])):  # "topped with x" needs its x
            edits.append((clause.start(), m.end(), ""))
    return edits


def _count_edits(text: str, rng: random.Random) -> list[Edit]:
    edits = []
    for m in _NUMBER_PATTERN.finditer(text):
        word = " ".join(m.group(0).lower().split())
        new = rng.choice([n for n in NUMBERS if n != word])
        edits.append((m.start(), m.end(), match_case(m.group(0), new)))
    for m in _DIGITS.finditer(text):
        value = int(m.group(0))
        new = value + rng.choice([d for d in (-2, -1, 1, 2, 3) if value + d >= 2])
        edits.append((m.start(), m.end(), str(new)))
    # "a dog is" -> "three dogs are"
    for m, form in _OBJECTS.find(text):
        before = re.search(r"(?<![\w-])(a|an|one)\s+$", text[:m.start()], re.IGNORECASE)
        if not before or form.number not in ("sg", "either"):
            continue
        count = rng.choice(NUMBERS[:4])
        end, tail = _agreement(text, m.end())
        edits.append((before.start(), end, match_case(before.group(1), count) + " " + plural(form.base) + tail))
    return edits


def _agreement(text: str, at: int) -> tuple[int, str]:
    """(end, text) that puts a singular verb right after position `at` into the plural ("is" -> "are")."""
    after = re.match(r"(\s+)(\w+)", text[at:])
    if after and after.group(2).lower() in _AGREEMENT:
        return at + after.end(), after.group(1) + match_case(after.group(2), _AGREEMENT[after.group(2).lower()])
    return at, ""


def attribute_edits(text: str, rng: random.Random) -> list[Edit]:
    """Swap a colour, material, texture, size or style word; with none, give an object an adjective."""
    edits = [e for table in _ATTRIBUTES.values() for e in table.swaps(text, rng)]
    if edits:
        return edits
    present = {w.lower() for w in re.findall(r"[\w-]+", text)}
    for m, form in _OBJECTS.find(text):
        before = re.findall(r"[\w']+", text[:m.start()].lower())
        if before and before[-1] in _DETERMINERS | set(NUMBERS):
            person = form.base in OBJECTS["person"]
            words = _INSERTED_PERSON_ADJECTIVES if person else _INSERTED_ADJECTIVES
            edits.append((m.start(), m.start(), rng.choice([a for a in words if a not in present]) + " "))
    if not edits:  # nothing to qualify: a style of its own, "..., cyberpunk style"
        end = len(text.rstrip(" .!;,"))
        style = rng.choice([w for w in ATTRIBUTES["style"][0] if w not in text.lower()])
        edits.append((end, end, f", {style} style"))
    return edits


def spatial_edits(text: str, rng: random.Random) -> list[Edit]:
    """Flip a relation (left/right, on/under, in front of/behind, ...) or a motion (sitting/standing)."""
    edits = []
    for pattern, table in ((_SPATIAL_PATTERN, _SPATIAL), (_MOTION_PATTERN, _MOTION)):
        for m in pattern.finditer(text):
            options = table[" ".join(m.group(0).lower().split())]
            edits.append((m.start(), m.end(), match_case(m.group(0), rng.choice(options))))
    for m in _ON.finditer(text):
        edits.append((m.start(), m.end(), match_case(m.group(0), "under")))
    if edits:
        return edits
    # no relation to flip: place the first object somewhere, or turn the whole picture around
    heads = [m for m, _form in _OBJECTS.find(text) if not text.startswith("'", m.end())]
    if heads:
        edits.append((heads[0].end(), heads[0].end(), " " + rng.choice(_PLACEMENTS)))
    else:
        end = len(text.rstrip(" .!;,"))
        edits.append((end, end, ", " + rng.choice([v for v in _VIEWS if v.split()[-1] not in text.lower()])))
    return edits


def context_edits(text: str, rng: random.Random) -> list[Edit]:
    """Swap the scene, time of day, weather, season, lighting or medium; with none, add one."""
    edits = [e for table in _CONTEXT.values() for e in table.swaps(text, rng)]
    if edits:
        return edits
    named = {kind for kind, pattern in _CONTEXT_WORDS.items() if pattern.search(text)}
    phrases = [p for p, kind in _ADDED_CONTEXT if kind not in named]
    end = len(text.rstrip(" .!;,"))
    return [(end, end, " " + rng.choice(phrases))]


EDITORS: dict[str, Callable[[str, random.Random], list[Edit]]] = {
    "content": content_edits, "attribute": attribute_edits, "spatial": spatial_edits, "context": context_edits}


def _rng(seed: int, *parts) -> random.Random:
    digest = hashlib.sha256("\0".join(map(str, (seed, *parts))).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def edit_caption(caption: str, kind: str, *, seed: int = 0, variant: int = 0) -> str | None:
    """One `kind` edit of `caption` (None when the rules find nothing to edit); the same for the same
    (caption, kind, seed, variant)."""
    if kind not in EDITORS:
        raise ValueError(f"unknown edit type {kind!r}; use one of {', '.join(EDIT_TYPES)}")
    rng = _rng(seed, caption, kind, variant)
    edits = EDITORS[kind](caption, rng)
    if not edits:
        return None
    start, end, new = rng.choice(edits)
    out = normalize_prompt(_splice(caption, start, end, new))
    out = re.sub(r"\s+([,.;!?])", r"\1", out)
    return None if caption_key(out) == caption_key(caption) or not caption_key(out) else out


# --- editors ---------------------------------------------------------------------------------------

@dataclass
class _Kept:
    """Negatives kept for one caption, refusing the caption itself and repeats."""

    caption: str
    dropped: Counter
    items: list[Negative] = field(default_factory=list)

    def add(self, text: str | None, kind: str) -> bool:
        text = normalize_prompt(text or "")
        if not caption_key(text):
            self.dropped["empty negative"] += 1
        elif caption_key(text) == caption_key(self.caption):
            self.dropped["negative equals the caption"] += 1
        elif any(caption_key(text) == caption_key(n.text) for n in self.items):
            self.dropped["repeated negative"] += 1
        else:
            self.items.append(Negative(text, kind))
            return True
        return False


def kinds_for(caption: str, count: int, seed: int) -> list[str]:
    """The edit kinds asked of a caption: all four in turn from a seeded start, so that over many
    captions every kind is asked for about equally even when `count` < 4."""
    start = _rng(seed, caption, "kinds").randrange(len(EDIT_TYPES))
    order = EDIT_TYPES[start:] + EDIT_TYPES[:start]
    return [order[i % len(order)] for i in range(count)]


class RulesEditor:
    """The offline editor: one kind of edit per negative where the caption allows it."""

    name = "rules"

    def __init__(self, seed: int = 0, *, attempts: int = 3):
        self.seed, self.attempts = seed, attempts
        self.dropped: Counter = Counter()

    def negatives(self, caption: str, count: int) -> list[Negative]:
        kept = _Kept(caption, self.dropped)
        wanted = kinds_for(caption, count, self.seed)
        for kind in wanted:  # 1. one of each kind asked for
            edited = edit_caption(caption, kind, seed=self.seed)
            if edited is None:
                self.dropped[f"no {kind} edit"] += 1
            else:
                kept.add(edited, kind)
        for variant in range(1, self.attempts):  # 2. the rarest kinds so far, edited another way
            if len(kept.items) >= count:
                break
            used = Counter(n.type for n in kept.items)
            for kind in sorted(EDIT_TYPES, key=lambda k: (used[k], wanted.index(k) if k in wanted else 9)):
                if len(kept.items) >= count:
                    break
                edited = edit_caption(caption, kind, seed=self.seed, variant=variant)
                if edited is not None:
                    kept.add(edited, kind)
        return kept.items[:count]

    def __call__(self, captions: Sequence[str], count: int) -> list[list[Negative]]:
        return [self.negatives(c, count) for c in captions]


LLM_INSTRUCTION = (
    "Edit the image caption so that it no longer matches the image, by one small change of the given type. "
    "Types: content (swap, add or remove an object, or change a count), attribute (change a colour, material, "
    "texture, size or style), spatial (change a position or motion: left/right, above/below, inside/outside, "
    "in front of/behind), context (change the scene, time of day, weather, season or lighting). "
    "Answer with the edited caption only.")


class HookEditor:
    """An `llm:` or `command:` editor over the pairs rewrite hook (trainer.policy.pairs)."""

    def __init__(self, spec: str, hook: Callable[[list[str]], list[str]], *, typed_inputs: bool, seed: int = 0):
        self.name, self.hook, self.typed_inputs, self.seed = spec, hook, typed_inputs, seed
        self.dropped: Counter = Counter()

    def __call__(self, captions: Sequence[str], count: int) -> list[list[Negative]]:
        asks = [(i, kind) for i, c in enumerate(captions) for kind in kinds_for(c, count, self.seed)]
        if self.typed_inputs:  # the LLM is told which kind of edit to make
            texts = [f"{captions[i]}\nType: {kind}" for i, kind in asks]
        else:  # a program gets the caption alone, `count` times
            texts = [captions[i] for i, _ in asks]
            asks = [(i, "other") for i, _ in asks]
        outputs = self.hook(texts) if texts else []
        if len(outputs) != len(texts):
            raise ValueError(f"the editor {self.name!r} returned {len(outputs)} lines for {len(texts)} captions")
        kept = [_Kept(c, self.dropped) for c in captions]
        for (i, kind), line in zip(asks, outputs, strict=True):
            label, tab, text = line.partition("\t")
            if tab and label.strip().lower() in NEGATIVE_TYPES:
                kind, line = label.strip().lower(), text
            kept[i].add(line, kind)
        return [k.items for k in kept]


def editor_from_spec(spec: str = "rules", *, seed: int = 0, instruction: str | None = None):
    """`rules`, `llm:<local causal LM folder>` or `command:<program>`."""
    from ..policy.pairs import rewriter_from_spec

    if spec == "rules":
        return RulesEditor(seed)
    kind, _, value = spec.partition(":")
    if kind not in ("llm", "command") or not value.strip():
        raise ValueError(f"--editor must be rules, llm:<model folder> or command:<program>; got {spec!r}")
    hook = rewriter_from_spec(spec, instruction=instruction or LLM_INSTRUCTION)
    return HookEditor(spec, hook, typed_inputs=(kind == "llm"), seed=seed)
