"""Seeded synthetic instruction data, written by this project: what the tests train on, and the example file
that `launch/recipes/smollm2_135m_lora_cpu.yaml` ships (`launch/data/`).

Nothing here comes from a third-party dataset, so it can be committed and redistributed (the Alpaca and chat files
under `../shared/data` cannot: CC BY-NC 4.0 / someone else's). Rows are built by code from small word and
sentence banks below, in the shapes users bring:

* `alpaca_rows(n, seed)`: `{"instruction", "input", "output"}`; `input` is empty in about 60% of rows (as in
  Alpaca). Task families with computed answers (arithmetic, unit conversion, dates, sorting, counting, case and
  word-order rewrites, capitals, translation), classification, summaries, code, emails, numbered tips and
  explanations of several paragraphs.
* `chat_rows(n, seed, turns)`: `{"messages": [...]}` with one or several user/assistant turns; about a third start
  with a system turn. Later user turns may refer back ("the last answer in upper case") with computed replies.
* `corpus_lines(seed)`: the text a test tokenizer is trained on (tests/conftest.py).

Variety on purpose: replies from one token ("Positive", "4") to several hundred tokens (the longest rows are longer
than the tests' max_seq_len of 128 and some longer than 256, so truncation is exercised), while every prompt stays
short enough (< 100 tokens with the test tokenizer) that no sample is dropped for having no target at 256 tokens.
Text has punctuation, numbers, newlines, Markdown lists, code blocks and non-ASCII characters (accents, ×, °, –,
’, CJK).

Determinism: one `random.Random(seed)` stream, only `random()`, `randrange`, `choice`, `sample` and `shuffle`
(stable across Python versions); so `alpaca_rows(64, s) == alpaca_rows(1000, s)[:64]`. Any change to this file
changes the data, and with it the test tokenizer, so pinned numbers in the tests (tests/integration/
test_loss_regression.py) must be re-derived, and the shipped example file regenerated:

    python -m tests.datagen alpaca --rows 1000 --seed 0 --out launch/data/synthetic_alpaca_1k.json
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from trainer.demo_task import MONTHS  # spelled out there, locale-independent

# ----------------------------------------------------------------------------------------------- banks
WORDS = [
    "apple",
    "river",
    "candle",
    "forest",
    "window",
    "pencil",
    "garden",
    "silver",
    "thunder",
    "harbor",
    "lantern",
    "meadow",
    "violin",
    "copper",
    "orange",
    "planet",
    "saddle",
    "tunnel",
    "marble",
    "falcon",
    "biscuit",
    "compass",
    "dolphin",
    "glacier",
    "hammock",
    "island",
    "jacket",
    "kettle",
    "lemon",
    "mirror",
]

SUBJECTS = [
    "The committee",
    "My neighbour",
    "The old bridge",
    "A small company",
    "The research team",
    "Our teacher",
    "The city council",
    "A young pianist",
    "The museum",
    "Every student",
    "The bakery on the corner",
    "The night train",
]
VERBS = [
    "announced",
    "finished",
    "painted",
    "repaired",
    "described",
    "measured",
    "visited",
    "ignored",
    "praised",
    "rebuilt",
    "photographed",
    "reviewed",
]
OBJECTS = [
    "the new schedule",
    "a wooden boat",
    "the north wall",
    "three short stories",
    "the annual budget",
    "a quiet garden",
    "the broken clock",
    "an unusual map",
    "the final report",
    "a bright mural",
]
ENDINGS = [
    "last Tuesday",
    "in under an hour",
    "after a long debate",
    "with great care",
    "before the storm",
    "for the first time",
    "despite the rain",
    "in 2019",
    "at 7:30 in the morning",
    "without any help",
]

CAPITALS = [
    ("France", "Paris"),
    ("Iceland", "Reykjavík"),
    ("Colombia", "Bogotá"),
    ("Brazil", "Brasília"),
    ("Paraguay", "Asunción"),
    ("Cameroon", "Yaoundé"),
    ("Japan", "Tokyo (東京)"),
    ("Poland", "Warsaw (Warszawa)"),
    ("Kenya", "Nairobi"),
    ("Canada", "Ottawa"),
    ("Peru", "Lima"),
    ("Vietnam", "Hanoi (Hà Nội)"),
    ("Turkey", "Ankara"),
    ("Egypt", "Cairo"),
    ("Norway", "Oslo"),
    ("Chile", "Santiago"),
]

PHRASES = {  # English -> {language: translation}
    "good morning": {"French": "bonjour", "Spanish": "buenos días", "German": "guten Morgen", "Japanese": "おはよう"},
    "thank you very much": {
        "French": "merci beaucoup",
        "Spanish": "muchas gracias",
        "German": "vielen Dank",
        "Japanese": "どうもありがとう",
    },
    "where is the station?": {
        "French": "où est la gare ?",
        "Spanish": "¿dónde está la estación?",
        "German": "wo ist der Bahnhof?",
        "Japanese": "駅はどこですか？",
    },
    "the coffee is too hot": {
        "French": "le café est trop chaud",
        "Spanish": "el café está demasiado caliente",
        "German": "der Kaffee ist zu heiß",
        "Japanese": "コーヒーが熱すぎる",
    },
    "see you tomorrow": {
        "French": "à demain",
        "Spanish": "hasta mañana",
        "German": "bis morgen",
        "Japanese": "また明日",
    },
    "I would like a glass of water": {
        "French": "je voudrais un verre d’eau",
        "Spanish": "quisiera un vaso de agua",
        "German": "ich hätte gern ein Glas Wasser",
        "Japanese": "水を一杯ください",
    },
}

NAMES = [
    "José",
    "Zoë",
    "Björn",
    "Łukasz",
    "Amélie",
    "Søren",
    "Chloé",
    "Nguyễn An",
    "Priya",
    "Mateo",
    "Ingrid",
    "Tomás",
    "Yuki",
    "Olusegun",
    "Fatima",
    "Hannah",
]
EMAIL_SUBJECTS = [
    "the project deadline",
    "next week’s meeting",
    "the invoice from March",
    "a lost umbrella",
    "the team lunch",
    "the new office hours",
    "a delayed shipment",
    "the conference in Lyon",
]
EMAIL_BODY = [
    "I hope this message finds you well.",
    "I wanted to follow up on {subject}.",
    "Could we move it to Thursday at 10:00?",
    "The numbers are attached; the total is €{amount}.",
    "Please let me know if anything is unclear.",
    "Thank you again for your patience – it is appreciated.",
    "I have copied Ingrid, who knows the details.",
    "We expect an answer by the 15th.",
    "If the date does not suit you, suggest another one.",
    "Sorry for the short notice.",
]

PRODUCTS = ["blender", "hotel room", "phone case", "novel", "pair of boots", "coffee machine", "tent", "headset"]
GOOD = ["excellent", "sturdy", "quiet", "comfortable", "well made", "great value"]
BAD = ["flimsy", "noisy", "overpriced", "uncomfortable", "late", "broken on arrival"]
FEELING = {"Positive": "liked", "Negative": "disliked", "Neutral": "was indifferent to"}
SENTIMENT_EXTRA = {
    "Positive": ["I would buy it again.", "Highly recommended!", "Five stars from me."],
    "Negative": ["I returned it after a week.", "Not worth the money.", "One star, sadly."],
    "Neutral": ["It does what it says.", "Nothing special either way.", "It is fine, I suppose."],
}

TOPICS = {
    "photosynthesis": [
        "Plants capture light with chlorophyll, the pigment that makes leaves green.",
        "The energy of that light splits water molecules and releases oxygen.",
        "Carbon dioxide from the air is then built into sugars such as glucose.",
        "Roughly 6 molecules of CO₂ and 6 of water give one molecule of glucose.",
        "The sugars feed the plant and, through food chains, almost every animal.",
        "Most of it happens in the chloroplasts of leaf cells.",
    ],
    "compound interest": [
        "Interest is added to the balance, and the next period earns interest on that larger sum.",
        "With 5% a year, 1,000 dollars becomes 1,050 after one year and about 1,628.89 after ten.",
        "The more often interest is compounded, the faster the balance grows.",
        "The rule of 72 estimates the doubling time: 72 divided by the rate in percent.",
        "Debt compounds too, which is why unpaid credit-card balances grow quickly.",
        "Starting early matters more than the exact rate.",
    ],
    "the water cycle": [
        "Water evaporates from oceans, lakes and soil when the sun warms it.",
        "The vapour rises, cools and condenses into the droplets that form clouds.",
        "When droplets grow heavy enough they fall as rain, snow or hail.",
        "Rivers and groundwater carry the water back to the sea.",
        "Plants also release vapour through their leaves, which is called transpiration.",
        "The whole cycle is driven by solar energy and gravity.",
    ],
    "binary search": [
        "Binary search finds a value in a sorted list by halving the range at every step.",
        "It compares the target with the middle element and keeps the half that can still hold it.",
        "A list of 1,000,000 items needs at most 20 comparisons.",
        "It only works when the data is sorted; otherwise the halving step is meaningless.",
        "Off-by-one errors in the bounds are the classic bug.",
        "Its running time is O(log n).",
    ],
    "vaccines": [
        "A vaccine trains the immune system to recognise a germ without causing the disease.",
        "It contains a weakened or inactive form of the germ, or instructions to make one of its proteins.",
        "The body responds by making antibodies and memory cells.",
        "If the real germ arrives later, the response is faster and stronger.",
        "When enough people are immune, outbreaks struggle to spread, which protects others too.",
        "Some vaccines need a booster dose after a few years.",
    ],
    "volcanoes": [
        "A volcano forms where molten rock, called magma, reaches the surface.",
        "Most volcanoes sit along the edges of tectonic plates.",
        "Pressure from dissolved gases can make an eruption explosive.",
        "Lava can reach temperatures above 1,100 °C.",
        "Volcanic ash is made of tiny, sharp fragments of rock and glass.",
        "Over time, weathered volcanic soil becomes very fertile.",
    ],
    "how a bicycle gear works": [
        "A bicycle gear changes how far the rear wheel turns for each turn of the pedals.",
        "A large front chainring with a small rear cog gives a high gear: fast but hard to push.",
        "A small chainring with a large cog gives a low gear, useful on steep hills.",
        "The derailleur moves the chain sideways from one cog to the next.",
        "The ratio is the number of teeth in front divided by the number at the back, e.g. 50/25 = 2.",
        "Shifting is smoother when the pedals turn with little force.",
    ],
    "bread baking": [
        "Bread needs flour, water, salt and a leavening agent such as yeast.",
        "Kneading develops gluten, the network of proteins that traps gas.",
        "Yeast ferments sugars and releases carbon dioxide, so the dough rises.",
        "A second, shorter rise is called proofing.",
        "Baking at around 220 °C sets the crumb and browns the crust.",
        "Letting the loaf cool for an hour keeps the inside from turning gummy.",
    ],
    "the TCP handshake": [
        "TCP opens a connection with three messages: SYN, SYN-ACK and ACK.",
        "The client sends SYN with an initial sequence number.",
        "The server answers SYN-ACK, acknowledging that number and sending its own.",
        "The client's ACK confirms the server's number, and data can flow.",
        "Sequence numbers let both sides detect lost or repeated packets.",
        "Closing uses a separate exchange of FIN and ACK messages.",
    ],
    "sleep": [
        "Adults need about 7 to 9 hours of sleep a night.",
        "Sleep runs in cycles of roughly 90 minutes, alternating light, deep and REM sleep.",
        "Deep sleep helps the body repair tissue; REM sleep is linked to memory and dreaming.",
        "Caffeine can stay active for 6 hours or more.",
        "A regular schedule, even at weekends, makes falling asleep easier.",
        "Screens late at night delay the release of melatonin.",
    ],
}
GENERIC = [
    "In short, {topic} is simpler than it first looks.",
    "Here is the idea in a few steps.",
    "A concrete example makes this clearer.",
    "That is the core of it; the rest is detail.",
    "People often get one thing wrong about {topic}.",
    "It is worth remembering this point.",
]

ACTIVITIES = {
    "learning a new language": [
        "Practise for 15 minutes every day rather than 2 hours once a week.",
        "Learn the 500 most common words first.",
        "Listen to podcasts at 0.75× speed.",
        "Speak from day one, even with mistakes.",
        "Write a short diary entry each evening.",
        "Use spaced repetition for vocabulary.",
        "Watch films with subtitles in the language.",
        "Find a conversation partner online.",
    ],
    "saving money": [
        "Track every expense for one month.",
        "Pay yourself first: move 10% to savings on payday.",
        "Cancel subscriptions you have not used in 30 days.",
        "Cook at home 5 nights a week.",
        "Wait 48 hours before any purchase over $100.",
        "Compare prices before renewing insurance.",
        "Keep an emergency fund of 3–6 months of expenses.",
        "Buy second-hand where it makes sense.",
    ],
    "running a first 5 km": [
        "Start with run–walk intervals: 1 minute running, 2 minutes walking.",
        "Run 3 times a week with a rest day between runs.",
        "Buy shoes that fit well.",
        "Increase your weekly distance by no more than 10%.",
        "Warm up for 5 minutes.",
        "Slow down: you should be able to talk while running.",
        "Drink water after each run.",
        "Sleep well the week before the race.",
    ],
    "writing clear emails": [
        "Put the request in the first sentence.",
        "Use a subject line that says what you need.",
        "Keep paragraphs to 2–3 sentences.",
        "Give dates and times in full: Tue 4 June, 14:00.",
        "Say what happens if there is no answer.",
        "Read it aloud once before sending.",
        "Use bullet points for several questions.",
        "Cut every word that adds nothing.",
    ],
}

CODE_TASKS = [
    (
        "returns the sum of a list of numbers",
        "total",
        "numbers",
        "    result = 0\n    for x in {arg}:\n        result += x\n    return result",
        "{name}([1, 2, 3]) == 6",
    ),
    (
        "counts the vowels in a string",
        "count_vowels",
        "text",
        '    return sum(1 for ch in {arg}.lower() if ch in "aeiou")',
        '{name}("banana") == 3',
    ),
    (
        "computes the factorial of n",
        "factorial",
        "n",
        "    if {arg} < 2:\n        return 1\n    return {arg} * {name}({arg} - 1)",
        "{name}(5) == 120",
    ),
    ("reverses a string", "reverse", "text", "    return {arg}[::-1]", '{name}("abc") == "cba"'),
    (
        "converts Celsius to Fahrenheit",
        "to_fahrenheit",
        "celsius",
        "    return {arg} * 9 / 5 + 32",
        "{name}(100) == 212.0",
    ),
    (
        "returns the largest value in a list",
        "largest",
        "values",
        "    best = {arg}[0]\n    for v in {arg}[1:]:\n        if v > best:\n            best = v\n    return best",
        "{name}([3, 9, 2]) == 9",
    ),
]


# ----------------------------------------------------------------------------------------------- helpers
def _sentence(rng: random.Random) -> str:
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ENDINGS)}."


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 11 <= n % 100 <= 13 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


DAYS_IN_MONTH = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]


def _explanation(rng: random.Random, topic: str, n_sentences: int) -> str:
    """`n_sentences` sentences about `topic` in paragraphs of 1-4 sentences, sometimes with a bullet list."""
    facts = TOPICS[topic]
    pool = []
    while len(pool) < n_sentences:
        batch = facts[:]
        rng.shuffle(batch)
        pool += batch + [rng.choice(GENERIC).format(topic=topic)]
    pool = pool[:n_sentences]
    paragraphs, i = [], 0
    while i < len(pool):
        k = 1 + rng.randrange(4)
        if rng.random() < 0.2 and len(pool) - i >= 3:
            paragraphs.append("\n".join(f"- {s}" for s in pool[i : i + 3]))
            i += 3
        else:
            paragraphs.append(" ".join(pool[i : i + k]))
            i += k
    return "\n\n".join(paragraphs)


# ----------------------------------------------------------------------------------------------- task families
# Each family: rng -> (instruction, input, output).
def _arithmetic(rng):
    a, b = rng.randrange(2, 1000), rng.randrange(2, 100)
    op = rng.choice(["+", "-", "×"])
    c = {"+": a + b, "-": a - b, "×": a * b}[op]
    style = rng.randrange(3)
    if style == 0:
        return f"What is {a} {op} {b}?", "", str(c)
    if style == 1:
        return "Calculate the result of the expression below.", f"{a} {op} {b}", f"{a} {op} {b} = {c}"
    sold = op == "-"
    n = a - b if sold else a + b
    question = f"Solve this word problem: a shop had {a} items and {'sold' if sold else 'received'} {b}. How many now?"
    return question, "", f"{a} {'-' if sold else '+'} {b} = {n}, so the shop has {n} items now."


def _temperature(rng):
    c = rng.randrange(-40, 120)
    f = c * 9 / 5 + 32
    if rng.random() < 0.5:
        return f"Convert {c} °C to Fahrenheit.", "", f"{c} °C is {f:.1f} °F."
    return (
        "Convert the temperature to Fahrenheit and explain the formula.",
        f"{c} °C",
        f"Multiply by 9/5 and add 32: {c} × 9/5 + 32 = {f:.1f}.\nSo {c} °C is {f:.1f} °F.",
    )


def _units(rng):
    km = rng.randrange(1, 500) / 4
    kind = rng.randrange(3)
    if kind == 0:
        return f"How many miles is {km:g} km?", "", f"{km:g} km is about {km * 0.621371:.2f} miles."
    if kind == 1:
        kg = rng.randrange(1, 200)
        return f"Convert {kg} kg to pounds.", "", f"{kg} kg ≈ {kg * 2.20462:.1f} lb."
    minutes = rng.randrange(61, 1000)
    return "Express the duration in hours and minutes.", f"{minutes} minutes", f"{minutes // 60} h {minutes % 60} min"


def _date(rng):
    year, month = rng.randrange(1900, 2100), rng.randrange(1, 13)
    day = rng.randrange(1, DAYS_IN_MONTH[month - 1] + 1)
    spelled = rng.choice(
        [
            f"{MONTHS[month - 1]} {day}, {year}",
            f"{_ordinal(day)} of {MONTHS[month - 1]} {year}",
            f"{day} {MONTHS[month - 1][:3]} {year}",
        ]
    )
    return f"Rewrite {spelled} in ISO format (YYYY-MM-DD).", "", f"{year:04d}-{month:02d}-{day:02d}"


def _sort_words(rng):
    words = rng.sample(WORDS, 3 + rng.randrange(8))
    if rng.random() < 0.5:
        return "Sort the following words alphabetically.", ", ".join(words), ", ".join(sorted(words))
    return (
        "Sort these words from shortest to longest; keep the original order for words of equal length.",
        " ".join(words),
        " ".join(sorted(words, key=len)),
    )


def _count(rng):
    s = _sentence(rng)
    if rng.random() < 0.5:
        return "How many words are in this sentence?", s, f"The sentence has {len(s.split())} words."
    word = rng.choice(WORDS)
    n = sum(ch in "aeiou" for ch in word)
    return f"How many vowels are in the word “{word}”?", "", f"{n}"


def _rewrite(rng):
    s = _sentence(rng)
    kind = rng.randrange(3)
    if kind == 0:
        return "Rewrite the sentence in upper case.", s, s.upper()
    if kind == 1:
        words = s.rstrip(".").split()
        return "Reverse the order of the words in the sentence.", s, " ".join(reversed(words)) + "."
    return "Turn the sentence into a question.", s, f"Is it true that {s[0].lower()}{s[1:-1]}?"


def _capital(rng):
    country, capital = rng.choice(CAPITALS)
    if rng.random() < 0.6:
        return f"What is the capital of {country}?", "", f"The capital of {country} is {capital}."
    picks = rng.sample(CAPITALS, 2 + rng.randrange(4))
    return (
        "Name the capital of each country.",
        "\n".join(c for c, _ in picks),
        "\n".join(f"{c}: {cap}" for c, cap in picks),
    )


def _translate(rng):
    phrase = rng.choice(sorted(PHRASES))
    lang = rng.choice(["French", "Spanish", "German", "Japanese"])
    if rng.random() < 0.5:
        return f"Translate into {lang}.", phrase, PHRASES[phrase][lang]
    return f"How do you say “{phrase}” in {lang}?", "", f"In {lang}: “{PHRASES[phrase][lang]}”."


def _sentiment(rng):
    label = rng.choice(["Positive", "Negative", "Neutral"])
    product = rng.choice(PRODUCTS)
    if label == "Positive":
        text = f"The {product} is {rng.choice(GOOD)} and {rng.choice(GOOD)}."
    elif label == "Negative":
        text = f"The {product} was {rng.choice(BAD)}, and support never replied."
    else:
        text = f"The {product} arrived on day {rng.randrange(2, 9)}."
    text += " " + rng.choice(SENTIMENT_EXTRA[label])
    if rng.random() < 0.5:
        return "Classify the sentiment of this review as Positive, Negative or Neutral.", text, label
    return (
        "What is the sentiment of the review? Answer with one word, then give a reason.",
        text,
        f"{label}. The reviewer {FEELING[label]} the {product}.",
    )


def _summary(rng):
    topic = rng.choice(sorted(TOPICS))
    facts = rng.sample(TOPICS[topic], 3)
    return (
        "Summarize the paragraph in one sentence.",
        " ".join(facts),
        f"The paragraph is about {topic}: {facts[0][0].lower()}{facts[0][1:]}",
    )


def _explain(rng):
    topic = rng.choice(sorted(TOPICS))
    n = rng.choice([1, 2, 3, 5, 7, 9, 11, 13, 16, 20, 24, 30])
    ask = rng.choice(
        [
            "Explain {t} to a beginner.",
            "Describe {t} in simple terms.",
            "What should I know about {t}?",
            "Write a short paragraph about {t}.",
            "Give an overview of {t}.",
        ]
    )
    return ask.format(t=topic), "", _explanation(rng, topic, n)


def _tips(rng):
    activity = rng.choice(sorted(ACTIVITIES))
    n = 2 + rng.randrange(7)
    tips = rng.sample(ACTIVITIES[activity], n)
    if rng.random() < 0.3:
        return (f"List {n} tips for {activity}.", "", "\n".join(f"{i}. {t}" for i, t in enumerate(tips, 1)))
    intro = f"Here are {n} tips for {activity}:\n\n"
    return (
        f"Give me some advice on {activity}.",
        "",
        intro + "\n".join(f"{i}. {t}" for i, t in enumerate(tips, 1)) + "\n\nGood luck – and be patient!",
    )


def _code(rng):
    what, name, arg, body, check = rng.choice(CODE_TASKS)
    name = rng.choice([name, name + "_of", "my_" + name])
    code = f"def {name}({arg}):\n" + body.format(arg=arg, name=name)
    out = f"```python\n{code}\n```"
    if rng.random() < 0.6:
        out += f"\n\nThe function takes `{arg}` and {what}. For example, `{check.format(name=name)}` is true."
    return f"Write a Python function that {what}.", "", out


def _email(rng):
    to, sender = rng.sample(NAMES, 2)
    subject = rng.choice(EMAIL_SUBJECTS)
    body = [
        s.format(subject=subject, amount=f"{rng.randrange(100, 99999) / 100:,.2f}")
        for s in rng.sample(EMAIL_BODY, 2 + rng.randrange(5))
    ]
    if rng.random() < 0.5:
        text = (
            f"Subject: {subject[0].upper()}{subject[1:]}\n\nDear {to},\n\n{' '.join(body)}\n\nBest regards,\n{sender}"
        )
        return f"Write a short email to {to} about {subject}.", "", text
    return (
        "Write a polite email using the details below.",
        f"To: {to}\nFrom: {sender}\nTopic: {subject}",
        f"Hi {to},\n\n" + "\n\n".join(body) + f"\n\nThanks,\n{sender}",
    )


def _story(rng):
    n = 2 + rng.randrange(16)
    name = rng.choice(NAMES)
    sents = [f"{name} woke up early on a {rng.choice(['rainy', 'bright', 'cold', 'windy'])} morning."]
    sents += [_sentence(rng) for _ in range(n)]
    sents.append(
        rng.choice(
            [
                "By evening, everything was quiet again.",
                "Nobody ever found out why.",
                "And that was only the beginning.",
            ]
        )
    )
    return f"Write a short story that starts with {name}.", "", " ".join(sents)


FAMILIES = [
    _arithmetic,
    _temperature,
    _units,
    _date,
    _sort_words,
    _count,
    _rewrite,
    _capital,
    _translate,
    _sentiment,
    _summary,
    _explain,
    _explain,
    _explain,
    _tips,
    _tips,
    _code,
    _email,
    _email,
    _story,
    _story,
]


# ----------------------------------------------------------------------------------------------- public
def alpaca_rows(n: int, seed: int = 0) -> list[dict]:
    """`n` Alpaca rows `{"instruction", "input", "output"}`, the same for the same seed (a prefix for fewer rows)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        instruction, input_, output = rng.choice(FAMILIES)(rng)
        rows.append({"instruction": instruction, "input": input_, "output": output})
    return rows


SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a concise assistant. Answer in as few words as possible.",
    "You are a friendly tutor who explains things step by step.",
    "Réponds en anglais, s’il te plaît. (Answer in English.)",
]


def _user_text(instruction: str, input_: str) -> str:
    return f"{instruction}\n\n{input_}" if input_ else instruction


def chat_rows(n: int, seed: int = 0, turns: int | tuple[int, int] = 1, system_share: float = 0.3) -> list[dict]:
    """`n` conversations `{"messages": [...]}` with `turns` user/assistant exchanges each (an int, or an inclusive
    (min, max) range); a share `system_share` of them start with a system turn. Follow-up user turns may refer to
    the previous answer ("in upper case", "in one line"), with replies computed from it."""
    rng = random.Random(seed)
    lo, hi = (turns, turns) if isinstance(turns, int) else turns
    out = []
    for _ in range(n):
        messages = []
        if rng.random() < system_share:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        for t in range(lo + rng.randrange(hi - lo + 1)):
            prev = messages[-1]["content"] if t else None
            kind = rng.randrange(3) if prev else 0
            if kind == 1 and len(prev) < 600:
                user, reply = "Please repeat your last answer in upper case.", prev.upper()
            elif kind == 2 and "\n" in prev:
                user = "Can you put that on a single line?"
                reply = " ".join(prev.split())
            else:
                instruction, input_, reply = rng.choice(FAMILIES)(rng)
                user = _user_text(instruction, input_)
                if t:
                    user = rng.choice(["Thanks! ", "Great. ", "OK, next one: ", ""]) + user
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        out.append({"messages": messages})
    return out


def suite_files() -> dict[str, list[dict]]:
    """The data the test suite reads, by file name (tests/conftest.py writes them into a temp folder)."""
    return {
        "alpaca_1k.json": alpaca_rows(1000, seed=0),
        "chat_single_turn.jsonl": chat_rows(50, seed=1, turns=1),
        "chat_multi_turn.jsonl": chat_rows(10, seed=2, turns=(2, 5)),
    }


def corpus_lines(files: dict[str, list[dict]] | None = None) -> list[str]:
    """Every non-empty text field of the test files, plus the role names: what the test tokenizer is trained on."""
    files = suite_files() if files is None else files
    lines = []
    for rows in files.values():
        for r in rows:
            if "messages" in r:
                lines += [m["content"] for m in r["messages"]]
            else:
                lines += [r["instruction"], r["input"], r["output"]]
    lines += ["user", "assistant", "system"]
    return [x for x in lines if x]


def dumps(name: str, rows: list[dict]) -> str:
    """The bytes written for `rows`: a JSON array with one row per line for .json, JSON lines for .jsonl; UTF-8
    characters kept as they are."""
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    if name.endswith(".jsonl"):
        return "".join(line + "\n" for line in lines)
    return "[\n" + ",\n".join(lines) + "\n]\n"


def write(path: Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.write_text(dumps(path.name, rows), encoding="utf-8")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.datagen", description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=("alpaca", "chat"))
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--turns", default="1", help="chat: exchanges per conversation, N or MIN-MAX (default 1)")
    p.add_argument("--out", required=True, help=".json (array) or .jsonl (lines)")
    args = p.parse_args(argv)
    if args.kind == "alpaca":
        rows = alpaca_rows(args.rows, args.seed)
    else:
        lo, _, hi = args.turns.partition("-")
        rows = chat_rows(args.rows, args.seed, turns=(int(lo), int(hi or lo)))
    print(f"{write(Path(args.out), rows)}: {len(rows)} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
