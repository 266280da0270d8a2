"""Regenerates the bundled review data for recipes/pipeline-rlhf.yaml (deterministic).

The task: one-sentence reviews. SFT data mixes positive and negative reviews (the model
learns the format, not a tone); each preference pair shares its sentence and differs only in
the sentiment words (so a reward model has to learn sentiment, not templates); rl prompts
ask for reviews, and the reward model pulls the policy towards positive ones.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
POS = ["great", "wonderful", "excellent", "amazing", "lovely", "fantastic", "delightful", "superb", "brilliant",
       "charming", "reliable", "comfortable", "beautiful", "impressive", "friendly", "enjoyable", "outstanding",
       "pleasant", "helpful", "cozy", "tasty", "fresh", "clean", "fast", "elegant", "solid", "smooth", "perfect"]
NEG = ["terrible", "awful", "horrible", "disappointing", "poor", "bad", "boring", "broken", "dirty", "slow", "rude",
       "ugly", "noisy", "flimsy", "bland", "stale", "uncomfortable", "annoying", "useless", "unreliable",
       "frustrating", "mediocre", "overpriced", "cramped", "confusing", "cold", "weak", "sad"]
TEMPLATES = [
    ("{It} is {a} and {b}.", {}),
    ("I found {it} {a}, and honestly {b}.", {}),
    ("Overall, {it} was {a}; {b} too.", {}),
    ("{It} felt {a} and {b}, and I {feel} it.", {"feel": ("loved", "regretted")}),
    ("What an experience: {it} was {a} and {b}.", {}),
    ("I would call {it} {a} and {b}, so {rec}.", {"rec": ("I recommend it", "avoid it")}),
    ("{It} turned out {a}, {b}, and {mood}.", {"mood": ("I am happy", "I am unhappy")}),
    ("My visit to {it} was {a} and the staff were {b}.", {}),
]
ITEMS = ["the new cafe on Main Street", "this coffee maker", "the hotel by the station", "the latest superhero movie",
         "my new phone", "this mystery novel", "the city bus service", "the park near the river",
         "the pizza place downtown", "this pair of running shoes", "the museum of modern art", "the online course",
         "the budget airline", "this vacuum cleaner", "the jazz concert", "the local library", "this board game",
         "the gym on Elm Street", "the camping tent", "the ramen shop", "this laptop", "the train to the coast",
         "the science museum", "this kitchen knife", "the weekend market", "the yoga class", "this podcast",
         "the car rental company", "the bakery on the corner", "the theme park"]
HELD_OUT = ["the seafood restaurant", "this desk lamp", "the ferry ride", "the art gallery", "this backpack",
            "the dentist office", "the bike shop", "this video game"]
PROMPTS = ["Write a one-sentence review of {it}.", "Review {it} in one sentence.",
           "In one sentence, what did you think of {it}?", "Give a short review of {it}."]


def sentence(rng, item, positive, template=None):
    text, slots = template or rng.choice(TEMPLATES)
    words = POS if positive else NEG
    a, b = rng.sample(words, 2)
    fill = {k: v[0] if positive else v[1] for k, v in slots.items()}
    it = item
    s = text.format(it=it, It=it[0].upper() + it[1:], a=a, b=b, **fill)
    return s[0].upper() + s[1:]


def pair(rng, item):
    template = rng.choice(TEMPLATES)
    return (rng.choice(PROMPTS).format(it=item), sentence(rng, item, True, template),
            sentence(rng, item, False, template))


def write(name, rows):
    with (HERE / name).open("w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")


def main():
    rng = random.Random(0)
    sft = []
    for i in range(160):
        item = rng.choice(ITEMS)
        sft.append({"messages": [{"role": "user", "content": rng.choice(PROMPTS).format(it=item)},
                                 {"role": "assistant", "content": sentence(rng, item, i % 2 == 0)}]})
    write("sft.jsonl", sft)
    pairs = []
    for _ in range(240):
        p, c, r = pair(rng, rng.choice(ITEMS))
        pairs.append({"prompt": p, "chosen": c, "rejected": r})
    write("pairs.jsonl", pairs)
    unpaired = [{"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"}
                for r in pairs[:120] for k in ("chosen", "rejected")]
    write("unpaired.jsonl", unpaired)
    evals = []
    for _ in range(32):
        p, c, r = pair(rng, rng.choice(HELD_OUT))
        evals.append({"prompt": p, "chosen": c, "rejected": r})
    write("pairs_eval.jsonl", evals)
    prompts = [{"prompt": t.format(it=item)} for item in ITEMS + HELD_OUT for t in PROMPTS[:2]]
    rng.shuffle(prompts)
    write("prompts.jsonl", prompts)


if __name__ == "__main__":
    main()
