"""Write the small corpus the README fine-tunes on: short made-up stories, from a seeded grammar.

    python tools/make_corpus.py [--out corpus/tinytales.txt] [--stories 800] [--seed 0]

Every story is drawn from the templates below with Python's random.Random(seed), so the committed file
is this script's output byte for byte (a test checks it). Stories are separated by a line holding only
<|endoftext|>, as TinyStories ships its raw text. The text is this project's own: it may be shipped.
"""

import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # microllama from this checkout

from microllama import flags  # noqa: E402

CORPUS = REPO / "corpus" / "tinytales.txt"

NAMES = ["Lily", "Tom", "Mia", "Ben", "Sara", "Max", "Anna", "Leo", "Zoe", "Sam", "Ella", "Jack", "Nora", "Finn"]
ANIMALS = ["cat", "dog", "bird", "frog", "bunny", "duck", "fox", "bear", "mouse", "owl"]
PLACES = ["the park", "the garden", "the beach", "the forest", "the farm", "the lake", "the hill", "the market"]
THINGS = ["a red ball", "a blue kite", "a shiny stone", "a big box", "a little boat", "a yellow hat", "an old map",
          "a soft blanket", "a green leaf", "a tiny key"]  # fmt: skip
FEELINGS = ["happy", "sad", "scared", "excited", "tired", "curious", "proud", "surprised"]
WEATHER = ["sunny", "rainy", "windy", "cold", "warm", "cloudy"]
FOODS = ["apples", "cookies", "bread", "soup", "cake", "berries", "carrots", "cheese"]

OPENINGS = [
    "Once upon a time, there was a {feeling} {animal} named {name}.",
    "One {weather} day, {name} went to {place}.",
    "There once was a little {animal} who lived near {place}.",
    "{name} woke up early. It was a {weather} morning.",
]
MIDDLES = [
    "{name} found {thing} under a tree.",
    "{name} saw a {animal} who looked {feeling}.",
    "The {animal} wanted to play with {thing}.",
    "{name} and the {animal} walked to {place} together.",
    "Then it started to rain, and {name} felt {feeling}.",
    "{name} shared some {food} with the {animal}.",
    'The {animal} said, "Can you help me find my home?"',
    '{name} asked, "Do you want to be my friend?"',
    "They looked for {thing} all day long.",
    "{name} climbed the hill to see {place} from above.",
]
ENDINGS = [
    "At the end of the day, {name} was very {feeling}.",
    "From that day on, {name} and the {animal} were best friends.",
    "{name} went home and ate {food} for dinner.",
    'The {animal} smiled and said, "Thank you, {name}!"',
    "They learned that sharing makes everyone happy.",
    "{name} kept {thing} in a safe place forever.",
]


def story(rng: random.Random) -> str:
    """One story: an opening, three to six middle sentences, an ending, with one set of characters."""
    slots = {"name": rng.choice(NAMES), "animal": rng.choice(ANIMALS), "place": rng.choice(PLACES),
             "thing": rng.choice(THINGS), "feeling": rng.choice(FEELINGS), "weather": rng.choice(WEATHER),
             "food": rng.choice(FOODS)}  # fmt: skip
    sentences = [rng.choice(OPENINGS)] + rng.sample(MIDDLES, rng.randint(3, 6)) + [rng.choice(ENDINGS)]
    return " ".join(s.format(**slots) for s in sentences)


def make_corpus(out: str = str(CORPUS), stories: int = 800, seed: int = 0) -> None:
    """Write STORIES stories drawn with SEED to OUT (default: the repository's corpus/tinytales.txt),
    separated by <|endoftext|> lines."""
    if stories < 1:
        raise ValueError(f"--stories must be at least 1, got {stories}")
    rng = random.Random(seed)
    text = "\n<|endoftext|>\n".join(story(rng) for _ in range(stories)) + "\n"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text, encoding="utf-8")
    print(f"wrote {out}: {stories} stories, {len(text.encode()):,} bytes")


if __name__ == "__main__":
    flags.run(make_corpus)
