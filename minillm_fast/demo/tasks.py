"""A generated instruction-following data set for the built-in demo: no download, same bytes on every machine.

The real MiniLLM experiments distil on databricks-dolly-15k; a laptop with no model hub needs something a model of a
few million parameters can learn in minutes on a CPU. This module writes such a set, in dolly's layout, from a small
closed vocabulary (about 450 distinct words, most of them in the word banks below) and nine task families:

=============== ======= ==================================================================================
family          context what the response is
=============== ======= ==================================================================================
arithmetic      no      a sum, difference or small product with the working shown (tens and ones)
word_problem    yes     "Tavi has 7 cups. Tavi gives 3 cups to Bimo." -> how many are left, or in all
word_order      yes     the context's word list reversed or sorted (A to Z, Z to A)
list_ops        yes     the list uppercased, de-duplicated, every other word, counted, first/last, initials
category        yes     the animals / fruits / vegetables / colors picked out of a mixed word list
units           no      a unit conversion (meters, hours, kilograms, ...) with small integers
describe        yes     a description of a generated creature from its attribute card, in one of three styles
fact_qa         yes     a question answered from a generated fact table ("The capital of Zorbia is Plim.")
story           no      a two-to-four-sentence story from a small grammar, for a named animal and object
=============== ======= ==================================================================================

Every family has several valid phrasings of the answer (a bare answer, a sentence, the working shown, three
description styles, freely sampled stories), so the data is multi-modal in the sense that matters for MiniLLM: a
student can cover all the modes (forward KL, SFT) or commit to one (reverse KL). The response stored is one phrasing
chosen at random; ``references`` lists every valid phrasing (for ``story``, whose valid answers cannot be listed, the
response and two more stories sampled for the same prompt), so evaluation takes Rouge-L as the max over references.

Each example is a :class:`TaskRecord`, a dict ``{"instruction", "context", "response", "references", "task"}``;
``context`` is ``""`` for the families without one. Responses run from one word (``"Plim."``) to about forty.

Splits and determinism. ``generate_splits(seed, sizes)`` fills each split with an equal share of every family (the
remainder going to the first families), from a ``random.Random`` seeded by the string ``"{seed}:{split}:{family}"``
(string seeds hash with SHA-512, so the bytes do not depend on ``PYTHONHASHSEED`` or the platform). Splits are drawn
in the order test, valid, train, and a prompt (instruction and context) already drawn anywhere is drawn again, so
no prompt appears twice in a split or in two splits, and the test set does not change when the train size does.
The smallest prompt space (``units``, 1,800 prompts) bounds a split set at about 16,000 examples in all; asking for
more raises ``ValueError``.
``write_splits`` writes ``{split}.jsonl`` files (one JSON object a line, keys in the order above, UTF-8, ``\\n``;
``minillm_fast.distill.data.read_jsonl`` reads them back, and the models see each example through the trainer's
prompt template, ``minillm_fast.distill.data.format_prompt``);
``write_pretrain_corpus`` writes the plain-text corpus of the pre-training term (fact sentences, descriptions,
stories, conversions, sums): one document a line, a blank line between documents (the paragraph convention of
``minillm_fast.distill.data.read_documents``; a reader that takes lines as documents and skips blank ones agrees).

Try the library without any download::

    from minillm_fast.demo import write_splits, write_pretrain_corpus, build_tokenizer, demo_tokenizer_texts
    paths = write_splits("demo_data", seed=0)                  # train/valid/test .jsonl: 4000/200/200 examples
    pt = write_pretrain_corpus("demo_data/pretrain.txt", seed=0)
    tok = build_tokenizer(demo_tokenizer_texts("demo_data"), "demo_data/tokenizer")

or from the shell: ``python -m minillm_fast.demo.tasks OUT_DIR [--seed 0] [--train 4000 --valid 200 --test 200]``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, TypedDict

__all__ = ["TASK_FAMILIES", "DEFAULT_SIZES", "TaskRecord", "generate_example", "generate_splits", "write_splits",
           "pretrain_corpus", "write_pretrain_corpus"]

# ----------------------------------------------------------------------------------------------------------------------
# Word banks: the whole vocabulary of the data set (plus the template words and the fixed phrasings below).
# ----------------------------------------------------------------------------------------------------------------------
ANIMALS = ["cat", "dog", "fox", "owl", "bear", "wolf", "horse", "mouse", "frog", "duck", "goat", "sheep", "bird",
           "fish", "lion", "tiger", "rabbit", "deer", "crow", "bee"]
FRUITS = ["apple", "banana", "cherry", "grape", "lemon", "mango", "melon", "peach", "pear", "plum", "fig", "kiwi",
          "lime"]
VEGETABLES = ["carrot", "onion", "potato", "tomato", "bean", "pea", "corn", "leek", "radish", "cabbage"]
OBJECTS = ["chair", "table", "lamp", "book", "cup", "door", "key", "ring", "box", "bell", "coat", "hat", "shoe",
           "boat", "drum", "spoon", "clock", "brush", "kite", "rope"]
COLORS = ["red", "blue", "green", "yellow", "white", "black", "brown", "pink", "gray", "purple", "gold", "silver"]
SIZES = ["small", "large", "tiny", "huge", "tall", "short", "round", "long"]
PLACES = ["forest", "river", "hill", "cave", "lake", "meadow", "garden", "desert", "island", "valley", "village",
          "marsh"]
FOODS = ["apples", "berries", "carrots", "cherries", "grapes", "nuts", "seeds", "fish", "bread", "cheese", "honey",
         "leaves", "grass", "beans", "corn", "plums", "pears"]
MOODS = ["happy", "brave", "shy", "kind", "clever", "sleepy", "curious", "gentle"]
NAMES = ["Bimo", "Tavi", "Lulo", "Zeb", "Mira", "Pok", "Nilo", "Rua", "Kesh", "Doli", "Fen", "Gima", "Hobi", "Jara",
         "Kiro", "Lumi", "Mako", "Nessa", "Oro", "Pip", "Quin", "Sula", "Teo", "Vela"]
COUNTRIES = ["Zorbia", "Quell", "Marnia", "Velska", "Tolland", "Brisk", "Ondra", "Pelune", "Karsh", "Dovia", "Elmar",
             "Frenn", "Gultra", "Hesk", "Imbra", "Jassa"]
CITIES = ["Plim", "Dros", "Hask", "Vell", "Orrin", "Tarn", "Mosk", "Pell", "Quor", "Sarn", "Ulth", "Wend", "Yarra",
          "Zell", "Brom", "Crail"]
LANGUAGES = ["Mellish", "Tovan", "Zorbic", "Kessic", "Ardish", "Pelunic", "Varric", "Oskan"]
RIVERS = ["Lom", "Eddra", "Orun", "Brell", "Tisk", "Mura", "Quen", "Yold", "Farr", "Sel"]
PLURALS = {"box": "boxes", "brush": "brushes", "cherry": "cherries", "potato": "potatoes", "tomato": "tomatoes",
           "mango": "mangoes", "peach": "peaches", "radish": "radishes", "fish": "fish", "sheep": "sheep",
           "deer": "deer", "mouse": "mice", "inch": "inches", "foot": "feet", "century": "centuries"}
CATEGORIES = {"animal": ANIMALS, "fruit": FRUITS, "vegetable": VEGETABLES, "color": COLORS}
COUNTABLE = OBJECTS + FRUITS  # things a character can have a number of
LIST_WORDS = ANIMALS + FRUITS + VEGETABLES + OBJECTS + COLORS


def plural(word: str) -> str:
    return PLURALS.get(word, word + "s")


def count_noun(n: int, word: str) -> str:
    """``"1 cup"``, ``"3 cups"``."""
    return f"{n} {word if n == 1 else plural(word)}"


def article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def and_join(items: Sequence[str]) -> str:
    """``"a"``, ``"a and b"``, ``"a, b and c"``."""
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def comma_list(items: Sequence[str]) -> str:
    return ", ".join(items)


def unique(items: Iterable[str]) -> List[str]:
    """Order-preserving de-duplication (never a set: set order depends on PYTHONHASHSEED)."""
    return list(dict.fromkeys(items))


class TaskRecord(TypedDict):
    """One generated example, as written to the ``.jsonl`` files (keys in this order)."""

    instruction: str
    context: str                # "" for the families without an input
    response: str               # the stored phrasing, one of ``references``
    references: List[str]       # every valid phrasing (a story: the response and two more samples)
    task: str                   # the family


# A family draws (instruction, context, references, index of the stored response) from an rng.
Draw = Tuple[str, str, List[str], int]


def _pick(rng: random.Random, refs: Sequence[str]) -> Tuple[List[str], int]:
    refs = unique(refs)
    return refs, rng.randrange(len(refs))


# ----------------------------------------------------------------------------------------------------------------------
# Task families
# ----------------------------------------------------------------------------------------------------------------------
# op -> (symbol, word, questions, the two worked answers). Format fields: the operands a and b, the result c, their
# tens and ones (a1 a0 b1 b0), and the working's partial results (sum of tens t and of ones o; a minus b's tens r;
# a times b's tens p1 and ones p0).
_ARITHMETIC = {
    "add": ("+", "plus", ("What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} plus {b}.",
                          "What is {a} plus {b}? Show your work."),
            ("{a1} + {b1} = {t}. {a0} + {b0} = {o}. {t} + {o} = {c}. The answer is {c}.",
             "First add the tens: {a1} + {b1} = {t}. Then add the ones: {a0} + {b0} = {o}. "
             "Together that makes {c}, so {a} + {b} = {c}.")),
    "sub": ("-", "minus", ("What is {a} - {b}?", "Subtract {b} from {a}.", "Compute {a} minus {b}.",
                           "What is {a} minus {b}? Show your work."),
            ("{a} - {b1} = {r}. {r} - {b0} = {c}. The answer is {c}.",
             "First take away the tens: {a} - {b1} = {r}. Then take away the ones: {r} - {b0} = {c}. "
             "So {a} - {b} = {c}.")),
    "mul": ("x", "times", ("What is {a} x {b}?", "Multiply {a} by {b}.", "Compute {a} times {b}.",
                           "What is {a} times {b}? Show your work."),
            ("{a} x {b1} = {p1}. {a} x {b0} = {p0}. {p1} + {p0} = {c}. The answer is {c}.",
             "First multiply the tens: {a} x {b1} = {p1}. Then multiply the ones: {a} x {b0} = {p0}. "
             "Together that makes {c}, so {a} x {b} = {c}.")),
}


def _operands(op: str, rng: random.Random) -> Tuple[int, int]:
    """Two-digit sums, differences with a positive result, a one-digit times a two-digit number."""
    if op == "add":
        return rng.randint(2, 99), rng.randint(2, 99)
    if op == "sub":
        a = rng.randint(10, 99)
        return a, rng.randint(2, a - 1)
    return rng.randint(2, 9), rng.randint(11, 39)


def _arithmetic(rng: random.Random) -> Draw:
    op = rng.choice(["add", "add", "sub", "sub", "mul"])
    a, b = _operands(op, rng)
    sym, word, questions, workings = _ARITHMETIC[op]
    c = {"add": a + b, "sub": a - b, "mul": a * b}[op]
    a1, a0, b1, b0 = a // 10 * 10, a % 10, b // 10 * 10, b % 10
    fields = dict(a=a, b=b, c=c, a1=a1, a0=a0, b1=b1, b0=b0, t=a1 + b1, o=a0 + b0, r=a - b1, p1=a * b1, p0=a * b0)
    instruction = rng.choice(questions).format(**fields)
    direct = [f"{a} {sym} {b} = {c}.", f"The answer is {c}.", f"{a} {word} {b} is {c}."]
    refs = [w.format(**fields) for w in workings] + ([] if "Show your work" in instruction else direct)
    return (instruction, "", *_pick(rng, refs))


def _word_problem(rng: random.Random) -> Draw:
    who, other = rng.sample(NAMES, 2)
    item = rng.choice(COUNTABLE)
    if rng.random() < 0.5:
        a = rng.randint(3, 20)
        b = rng.randint(1, a - 1)
        c = a - b
        context = rng.choice([f"{who} has {count_noun(a, item)}. {who} gives {b} to {other}.",
                              f"{who} has {count_noun(a, item)}. {who} loses {b} of them."])
        instruction = rng.choice([f"How many {plural(item)} does {who} have now?",
                                  f"How many {plural(item)} does {who} have left?"])
        refs = [f"{who} has {a} - {b} = {count_noun(c, item)} now.",
                f"{a} - {b} = {c}. {who} has {count_noun(c, item)} left.",
                f"{cap(count_noun(c, item))}."]
    else:
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        c = a + b
        context = rng.choice([f"{who} has {count_noun(a, item)}. {other} gives {who} {b} more.",
                              f"{who} has {count_noun(a, item)} and {other} has {count_noun(b, item)}."])
        if "more" in context:
            instruction = rng.choice([f"How many {plural(item)} does {who} have now?",
                                      f"How many {plural(item)} does {who} have in the end?"])
            refs = [f"{who} has {a} + {b} = {count_noun(c, item)} now.",
                    f"{a} + {b} = {c}. {who} has {count_noun(c, item)}.", f"{cap(count_noun(c, item))}."]
        else:
            instruction = rng.choice([f"How many {plural(item)} do they have together?",
                                      f"How many {plural(item)} do {who} and {other} have in all?"])
            refs = [f"Together they have {a} + {b} = {count_noun(c, item)}.",
                    f"{a} + {b} = {c}. They have {count_noun(c, item)} in all.", f"{cap(count_noun(c, item))}."]
    return (instruction, context, *_pick(rng, refs))


def _word_order(rng: random.Random) -> Draw:
    words = rng.sample(LIST_WORDS, rng.randint(3, 9))
    op = rng.choice(["reverse", "sort", "sort_desc"])
    if op == "reverse":
        out = list(reversed(words))
        instruction = rng.choice(["Reverse the order of these words.", "Write these words in reverse order.",
                                  "List the words from last to first."])
        lead = "Here are the words in reverse order"
    elif op == "sort":
        out = sorted(words)
        instruction = rng.choice(["Sort these words in alphabetical order.", "Put these words in alphabetical order.",
                                  "Arrange the words from A to Z."])
        lead = "In alphabetical order"
    else:
        out = sorted(words, reverse=True)
        instruction = rng.choice(["Sort these words in reverse alphabetical order.", "Arrange the words from Z to A."])
        lead = "From Z to A"
    return (instruction, comma_list(words), *_pick(rng, [comma_list(out), f"{lead}: {comma_list(out)}."]))


def _list_ops(rng: random.Random) -> Draw:
    op = rng.choice(["upper", "dedupe", "every_other", "count", "first_last", "initials"])
    words = rng.sample(LIST_WORDS, rng.randint(3, 8))
    if op == "upper":
        out = comma_list(w.upper() for w in words)
        instruction = rng.choice(["Write these words in capital letters.", "Convert each word to uppercase."])
        refs = [out, f"In capital letters: {out}."]
    elif op == "dedupe":
        repeated = list(words)
        for _ in range(rng.randint(1, 4)):
            repeated.insert(rng.randint(1, len(repeated)), rng.choice(words))
        words, out = repeated, comma_list(unique(repeated))
        instruction = rng.choice(["Remove the repeated words from the list.",
                                  "Remove duplicates, keeping the first time each word appears."])
        refs = [out, f"Without repeats the list is: {out}."]
    elif op == "every_other":
        out = comma_list(words[::2])
        instruction = rng.choice(["Keep every other word, starting with the first.",
                                  "Write the first, third, fifth word and so on."])
        refs = [out, f"Every other word: {out}."]
    elif op == "count":
        n = len(words)
        instruction = rng.choice(["How many words are in this list?", "Count the words in the list."])
        refs = [f"There are {n} words.", f"The list has {n} words.", f"{n}"]
    elif op == "first_last":
        instruction = rng.choice(["What are the first and last words of the list?",
                                  "Name the first word and the last word."])
        refs = [f"The first word is {words[0]} and the last word is {words[-1]}.",
                f"First: {words[0]}. Last: {words[-1]}.", f"{words[0]} and {words[-1]}"]
    else:
        initials = [w[0] for w in words]
        instruction = rng.choice(["Write the first letter of each word.", "Give the initial letter of every word."])
        refs = [comma_list(initials), f"The first letters are {and_join(initials)}."]
    return (instruction, comma_list(words), *_pick(rng, refs))


def _category(rng: random.Random) -> Draw:
    name = rng.choice(list(CATEGORIES))
    members = CATEGORIES[name]
    others = [w for w in LIST_WORDS if w not in members]
    k_in = rng.randint(1, 4)
    words = rng.sample(members, k_in) + rng.sample(others, rng.randint(2, 6))
    rng.shuffle(words)
    hits = [w for w in words if w in members]
    instruction = rng.choice([f"Which of these words are {plural(name)}?", f"List only the {plural(name)}.",
                              f"Pick out the {plural(name)} from this list."])
    sentence = (f"The only {name} in the list is {hits[0]}." if len(hits) == 1
                else f"The {plural(name)} are {and_join(hits)}.")
    return (instruction, comma_list(words), *_pick(rng, [comma_list(hits), sentence, and_join(hits)]))


UNITS = [("meter", "centimeter", 100), ("kilometer", "meter", 1000), ("hour", "minute", 60),
         ("minute", "second", 60), ("day", "hour", 24), ("week", "day", 7), ("kilogram", "gram", 1000),
         ("dollar", "cent", 100), ("year", "month", 12), ("foot", "inch", 12), ("liter", "milliliter", 1000),
         ("century", "year", 100)]


def _units(rng: random.Random) -> Draw:
    big, small, f = rng.choice(UNITS)
    n = rng.randint(1, 25)
    m = n * f
    fact = f"There are {f} {plural(small)} in {article(big)}"
    if rng.random() < 0.5:
        instruction = rng.choice([f"Convert {count_noun(n, big)} to {plural(small)}.",
                                  f"How many {plural(small)} are in {count_noun(n, big)}?",
                                  f"Express {count_noun(n, big)} in {plural(small)}."])
        refs = [f"{cap(count_noun(n, big))} is {count_noun(m, small)}.",
                f"{fact}, so {count_noun(n, big)} is {n} x {f} = {count_noun(m, small)}.",
                f"{cap(count_noun(m, small))}."]
    else:
        instruction = rng.choice([f"Convert {count_noun(m, small)} to {plural(big)}.",
                                  f"How many {plural(big)} are in {count_noun(m, small)}?",
                                  f"Express {count_noun(m, small)} in {plural(big)}."])
        refs = [f"{cap(count_noun(m, small))} is {count_noun(n, big)}.",
                f"{fact}, so {count_noun(m, small)} is {m} / {f} = {count_noun(n, big)}.",
                f"{cap(count_noun(n, big))}."]
    return (instruction, "", *_pick(rng, refs))


def _creature(rng: random.Random) -> Dict[str, str]:
    """A generated creature: a name and a kind, and a random subset of the other attributes."""
    card = {"name": rng.choice(NAMES), "kind": rng.choice(ANIMALS)}
    optional = [("color", COLORS), ("size", SIZES), ("mood", MOODS), ("home", PLACES), ("food", FOODS),
                ("friend", NAMES)]
    for key, bank in rng.sample(optional, rng.randint(1, len(optional))):
        card[key] = rng.choice([w for w in bank if w != card["name"]])
    return {k: card[k] for k in ("name", "kind", "color", "size", "mood", "home", "food", "friend") if k in card}


def _phrases(card: Mapping[str, str], **templates: str) -> List[str]:
    """``template.format(card[key])`` for each ``key=template`` whose attribute the card has, in that order."""
    return [template.format(card[key]) for key, template in templates.items() if key in card]


def describe_styles(card: Mapping[str, str]) -> List[str]:
    """The three valid descriptions of a creature card: one sentence, short sentences, a 'meet' paragraph."""
    name, kind = card["name"], card["kind"]
    adjs = [card[k] for k in ("mood", "size", "color") if k in card]
    # style 1: one sentence
    tail = _phrases(card, home="lives in the {}", food="eats {}", friend="plays with {}")
    one = f"{name} is {article(' '.join(adjs + [kind]))}"
    one += (" that " + and_join(tail) + ".") if tail else "."
    # style 2: short sentences
    short = [f"{name} is {article(kind)}."] + ([f"It is {and_join(adjs)}."] if adjs else [])
    short += _phrases(card, home="It lives in the {}.", food="It eats {}.", friend="Its friend is {}.")
    # style 3: "Meet ..."
    first = f"Meet {name}, {article(' '.join(([card['color']] if 'color' in card else []) + [kind]))}."
    meet = [first]
    rest = [card[k] for k in ("mood", "size") if k in card]
    if rest:
        meet.append(f"{name} is {and_join(rest)}.")
    if "home" in card and "food" in card:
        meet.append(f"Its home is the {card['home']}, and its favorite food is {card['food']}.")
    elif "home" in card:
        meet.append(f"Its home is the {card['home']}.")
    elif "food" in card:
        meet.append(f"Its favorite food is {card['food']}.")
    if "friend" in card:
        meet.append(f"{card['friend']} is its best friend.")
    return [one, " ".join(short), " ".join(meet)]


def _describe(rng: random.Random) -> Draw:
    card = _creature(rng)
    context = "\n".join(f"{k.capitalize()}: {v}" for k, v in card.items())
    instruction = rng.choice([f"Describe {card['name']}.", f"Write a short description of {card['name']}.",
                              f"Tell me about {card['name']}.", "Describe the creature on this card."])
    return (instruction, context, *_pick(rng, describe_styles(card)))


# relation -> (fact sentence, questions, answers); {c} country, {v} value
RELATIONS = {
    "capital": (CITIES, "The capital of {c} is {v}.",
                ["What is the capital of {c}?", "Which city is the capital of {c}?", "Name the capital of {c}."],
                ["{v}.", "The capital of {c} is {v}.", "{c} has {v} as its capital."]),
    "language": (LANGUAGES, "People in {c} speak {v}.",
                 ["What language do people in {c} speak?", "Which language is spoken in {c}?"],
                 ["{v}.", "People in {c} speak {v}.", "The language of {c} is {v}."]),
    "river": (RIVERS, "The longest river in {c} is the {v}.",
              ["What is the longest river in {c}?", "Which river is the longest in {c}?"],
              ["The {v}.", "The longest river in {c} is the {v}.", "It is the {v}."]),
    "animal": (ANIMALS, "The national animal of {c} is the {v}.",
               ["What is the national animal of {c}?", "Which animal is the symbol of {c}?"],
               ["The {v}.", "The national animal of {c} is the {v}.", "It is the {v}."]),
    "flag": (COLORS, "The flag of {c} is {v}.",
             ["What color is the flag of {c}?", "Which color is the flag of {c}?"],
             ["{V}.", "The flag of {c} is {v}.", "It is {v}."]),
}


def _fact_table(rng: random.Random, n_countries: int) -> List[Tuple[str, str, str]]:
    """(country, relation, value) facts, values distinct per relation so every question has one answer."""
    countries = rng.sample(COUNTRIES, n_countries)
    values = {rel: rng.sample(bank, n_countries) for rel, (bank, *_) in RELATIONS.items()}
    facts = []
    for i, c in enumerate(countries):
        for rel in rng.sample(list(RELATIONS), rng.randint(1, 3)):
            facts.append((c, rel, values[rel][i]))
    rng.shuffle(facts)
    return facts


def _fact_sentence(fact: Tuple[str, str, str]) -> str:
    c, rel, v = fact
    return RELATIONS[rel][1].format(c=c, v=v)


def _fact_qa(rng: random.Random) -> Draw:
    facts = _fact_table(rng, rng.randint(2, 4))
    c, rel, v = rng.choice(facts)
    _, _, questions, answers = RELATIONS[rel]
    instruction = rng.choice(questions).format(c=c)
    refs = [a.format(c=c, v=v, V=cap(v)) for a in answers]
    return (instruction, " ".join(_fact_sentence(f) for f in facts), *_pick(rng, refs))


def _story_text(rng: random.Random, animal: str, thing: str, name: str) -> str:
    mood, color, place, food = rng.choice(MOODS), rng.choice(COLORS), rng.choice(PLACES), rng.choice(FOODS)
    friend = rng.choice([a for a in ANIMALS if a != animal])
    opening = rng.choice([f"Once there was {article(mood + ' ' + animal)} named {name}.",
                          f"{name} was {article(mood + ' ' + animal)} who lived in the {place}.",
                          f"{cap(article(mood + ' ' + animal))} called {name} lived near the {place}."])
    middle = rng.choice([f"One day {name} found {article(color + ' ' + thing)} by the {place}.",
                         f"{name} saw {article(thing)} in the {place}.",
                         f"While looking for {food}, {name} found {article(color + ' ' + thing)}."])
    extra = rng.choice(["", f"It was the best {thing} {name} had ever seen.",
                        f"{cap(article(friend))} came to look at it too.", f"{name} did not know what to do."])
    ending = rng.choice([f"{name} took the {thing} home and was {rng.choice(MOODS)}.",
                         f"Then {name} gave the {thing} to {article(friend)}.",
                         f"{name} and the {friend} shared some {food}.", "The end."])
    return " ".join(s for s in (opening, middle, extra, ending) if s)


def _story(rng: random.Random) -> Draw:
    animal, thing, name = rng.choice(ANIMALS), rng.choice(OBJECTS), rng.choice(NAMES)
    instruction = rng.choice([f"Write a short story about {article(animal)} and {article(thing)}.",
                              f"Tell a story about {article(animal)} who finds {article(thing)}.",
                              f"Write a short story about {article(animal)} named {name}.",
                              f"Write a short story about {article(animal)} named {name} and {article(thing)}."])
    refs = [_story_text(rng, animal, thing, name) for _ in range(3)]
    return (instruction, "", unique(refs), 0)  # three samples of an open-ended answer; the first is the response


TASK_FAMILIES: Dict[str, Callable[[random.Random], Draw]] = {
    "arithmetic": _arithmetic, "word_problem": _word_problem, "word_order": _word_order, "list_ops": _list_ops,
    "category": _category, "units": _units, "describe": _describe, "fact_qa": _fact_qa, "story": _story,
}
DEFAULT_SIZES: Dict[str, int] = {"train": 4000, "valid": 200, "test": 200}
_SPLIT_RANK = {"test": 0, "valid": 1, "validation": 1, "train": 2}


def generate_example(family: str, rng: random.Random) -> TaskRecord:
    """One example of ``family`` drawn from ``rng``: ``{"instruction", "context", "response", "references",
    "task"}``, with ``response in references``."""
    if family not in TASK_FAMILIES:
        raise ValueError(f"family={family!r} is not one of {list(TASK_FAMILIES)}")
    instruction, context, refs, i = TASK_FAMILIES[family](rng)
    return {"instruction": instruction, "context": context, "response": refs[i], "references": refs, "task": family}


def generate_splits(seed: int = 0, sizes: Optional[Mapping[str, int]] = None,
                    families: Optional[Sequence[str]] = None, max_tries: int = 1000) -> Dict[str, List[TaskRecord]]:
    """Examples for each split, every family equally represented, no prompt repeated within or across splits.

    ``sizes`` maps split name to number of examples (default ``DEFAULT_SIZES``: 4000/200/200); ``families`` a subset
    of ``TASK_FAMILIES`` (default all). The result is a pure function of the arguments (see the module docstring).
    """
    sizes = dict(DEFAULT_SIZES if sizes is None else sizes)
    families = list(TASK_FAMILIES if families is None else families)
    for f in families:
        if f not in TASK_FAMILIES:
            raise ValueError(f"families contains {f!r}, which is not one of {list(TASK_FAMILIES)}")
    for name, n in sizes.items():
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"sizes[{name!r}] must be a non-negative int, got {n!r}")
    seen = set()  # prompts drawn so far (membership only; never iterated, so hash order cannot leak into output)
    out: Dict[str, List[TaskRecord]] = {}
    order = sorted(sizes, key=lambda s: (_SPLIT_RANK.get(s, 3), list(sizes).index(s)))
    for split in order:
        examples = []
        for i, family in enumerate(families):
            rng = random.Random(f"{seed}:{split}:{family}")
            count = sizes[split] // len(families) + (i < sizes[split] % len(families))
            for _ in range(count):
                for _ in range(max_tries):
                    ex = generate_example(family, rng)
                    key = (ex["instruction"], ex["context"])
                    if key not in seen:
                        break
                else:
                    raise ValueError(f"family {family!r} drew {max_tries} prompts in a row that were already used; "
                                     f"ask for fewer examples (sizes={sizes})")
                seen.add(key)
                examples.append(ex)
        random.Random(f"{seed}:{split}:order").shuffle(examples)
        out[split] = examples
    return {split: out[split] for split in sizes}


def _write_lines(path: Path, lines: Iterable[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for line in lines:
            f.write(line + "\n")
    return path


def write_splits(out_dir, seed: int = 0, sizes: Optional[Mapping[str, int]] = None) -> Dict[str, Path]:
    """Write ``{out_dir}/{split}.jsonl`` for each split of ``generate_splits(seed, sizes)``; return the paths by
    split name. Same arguments, byte-identical files."""
    out_dir = Path(out_dir)
    return {split: _write_lines(out_dir / f"{split}.jsonl", (json.dumps(ex, ensure_ascii=False) for ex in examples))
            for split, examples in generate_splits(seed, sizes).items()}


# ----------------------------------------------------------------------------------------------------------------------
# Pre-training corpus (the PT term of MiniLLM: plain text from the same world, no instructions)
# ----------------------------------------------------------------------------------------------------------------------
def _pt_facts(rng: random.Random) -> str:
    return " ".join(_fact_sentence(f) for f in _fact_table(rng, rng.randint(1, 3)))


def _pt_description(rng: random.Random) -> str:
    return rng.choice(describe_styles(_creature(rng)))


def _pt_story(rng: random.Random) -> str:
    return _story_text(rng, rng.choice(ANIMALS), rng.choice(OBJECTS), rng.choice(NAMES))


def _pt_units(rng: random.Random) -> str:
    sents = []
    for big, small, f in rng.sample(UNITS, rng.randint(1, 3)):
        n = rng.randint(1, 20)
        sents.append(rng.choice([f"There are {f} {plural(small)} in {article(big)}.",
                                 f"{cap(count_noun(n, big))} is {count_noun(n * f, small)}."]))
    return " ".join(sents)


def _pt_sums(rng: random.Random) -> str:
    sents = []
    for _ in range(rng.randint(1, 4)):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        sents.append(rng.choice([f"{a} + {b} = {a + b}.", f"{max(a, b)} - {min(a, b)} = {max(a, b) - min(a, b)}.",
                                 f"{a % 9 + 1} x {b} = {(a % 9 + 1) * b}."]))
    return " ".join(sents)


def _pt_categories(rng: random.Random) -> str:
    sents = []
    for name in rng.sample(list(CATEGORIES), rng.randint(1, 3)):
        words = rng.sample(CATEGORIES[name], rng.randint(1, 3))
        sents.append(rng.choice([f"{cap(article(w))} is {article(name)}." for w in words]
                                + [f"{cap(and_join([plural(w) for w in words]))} are {plural(name)}."]))
    return " ".join(sents)


_PT_KINDS = [_pt_facts, _pt_description, _pt_story, _pt_units, _pt_sums, _pt_categories]


def pretrain_corpus(seed: int = 0, n_lines: int = 3000) -> List[str]:
    """``n_lines`` plain-text documents (one to a few sentences each) drawn in turn from facts, descriptions, stories,
    conversions, sums and category sentences."""
    if n_lines < 0:
        raise ValueError(f"n_lines must be >= 0, got {n_lines}")
    rng = random.Random(f"{seed}:pretrain")
    return [_PT_KINDS[i % len(_PT_KINDS)](rng) for i in range(n_lines)]


def write_pretrain_corpus(path, seed: int = 0, n_lines: int = 3000) -> Path:
    """Write ``pretrain_corpus(seed, n_lines)`` to ``path``: one document a line, documents separated by a blank line
    (so blank-line paragraph readers and line readers both see ``n_lines`` documents)."""
    docs = pretrain_corpus(seed, n_lines)
    return _write_lines(Path(path), (doc + ("\n" if i + 1 < len(docs) else "") for i, doc in enumerate(docs)))


def _main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minillm_fast.demo.tasks", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    for split, n in DEFAULT_SIZES.items():
        parser.add_argument(f"--{split}", type=int, default=n, help=f"examples in {split}.jsonl (default {n})")
    parser.add_argument("--pretrain-lines", type=int, default=3000)
    args = parser.parse_args(argv)
    paths = write_splits(args.out_dir, args.seed, {s: getattr(args, s) for s in DEFAULT_SIZES})
    paths["pretrain"] = write_pretrain_corpus(os.path.join(args.out_dir, "pretrain.txt"), args.seed,
                                              args.pretrain_lines)
    for name, path in paths.items():
        print(f"{name:9s} {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
