"""Writes preferences.jsonl, the preference set of examples/smollm2-dpo.yaml: questions with a
helpful answer (chosen) and a dismissive one (rejected), in TRL's conversational format. The
preference is clear and learnable: answer the question, do not brush it off.

    python examples/data/make_preferences.py   # deterministic: rewrites the same file
"""

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon", "Japan": "Tokyo",
    "Canada": "Ottawa", "Australia": "Canberra", "Egypt": "Cairo", "Kenya": "Nairobi", "Norway": "Oslo",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw", "Greece": "Athens", "Ireland": "Dublin",
    "Austria": "Vienna", "Hungary": "Budapest", "Peru": "Lima", "Chile": "Santiago", "Argentina": "Buenos Aires",
    "Mexico": "Mexico City", "India": "New Delhi", "China": "Beijing", "Thailand": "Bangkok", "Vietnam": "Hanoi",
    "Turkey": "Ankara", "Morocco": "Rabat", "Denmark": "Copenhagen", "Belgium": "Brussels",
}
OPPOSITES = {
    "hot": "cold", "up": "down", "early": "late", "happy": "sad", "light": "dark", "full": "empty", "fast": "slow",
    "open": "closed", "strong": "weak", "wet": "dry", "loud": "quiet", "rich": "poor", "old": "young", "hard": "soft",
    "high": "low", "near": "far", "thick": "thin", "clean": "dirty", "win": "lose", "begin": "end",
}
DISMISSIVE = [
    "Look it up yourself.",
    "I don't feel like answering that.",
    "Why would I know? Ask someone else.",
    "That's not my problem.",
    "Figure it out on your own.",
    "Not worth my time.",
    "Ugh, another boring question. No.",
    "I could tell you, but I won't.",
    "Go search the internet.",
    "Stop asking me things like that.",
    "Whatever. I'm not answering.",
    "You should already know that.",
]


def pairs(rng: random.Random):
    for country, city in CAPITALS.items():
        yield f"What is the capital of {country}?", f"The capital of {country} is {city}."
        yield f"Which city is the capital of {country}?", f"{city} is the capital of {country}."
    for word, opposite in OPPOSITES.items():
        yield f"What is the opposite of \"{word}\"?", f"The opposite of \"{word}\" is \"{opposite}\"."
    for _ in range(150):
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        yield f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    for _ in range(100):
        m = rng.randint(2, 30)
        yield f"How many centimeters are in {m} meters?", f"{m} meters is {m * 100} centimeters."


def main() -> None:
    rng = random.Random(0)
    rows = []
    for question, answer in pairs(rng):
        rows.append({
            "prompt": [{"role": "user", "content": question}],
            "chosen": [{"role": "assistant", "content": answer}],
            "rejected": [{"role": "assistant", "content": rng.choice(DISMISSIVE)}],
        })
    rng.shuffle(rows)
    out = Path(__file__).with_name("preferences.jsonl")
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"wrote {len(rows)} pairs to {out}")


if __name__ == "__main__":
    main()
