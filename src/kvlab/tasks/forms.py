"""Needle forms: how a fact is worded and what kind of value it holds.

One form per kind of value a fused cache can lose in its own way: numbers of 3, 5 and 9
digits, a person's name, a hiding place, a town, a date, a time, a password with punctuation
(scored verbatim) and a multi-word motto. Subjects ("the amber archive") and values are drawn
from fixed lists with a seeded generator; names and towns are invented so that a model cannot
answer from what it already knows.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass

ADJECTIVES = ("amber", "blue", "copper", "crooked", "eastern", "glass", "hidden", "iron", "marble", "northern",
              "old", "quiet", "red", "silver", "stone", "winter")
NOUNS = ("archive", "bridge", "chapel", "depot", "gallery", "harbour", "lighthouse", "library", "market", "mill",
         "museum", "observatory", "tower", "vault", "workshop", "station")
FIRST_NAMES = ("Alma", "Bruno", "Celia", "Dmitri", "Edith", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kalina",
               "Lionel", "Mireille", "Nikos", "Odile", "Pavel", "Quentin", "Rosalind", "Soren", "Tamsin", "Ulrich",
               "Vera", "Wendell", "Yusuf")
LAST_NAMES = ("Ashdown", "Brennick", "Castellan", "Dunmore", "Elsworth", "Fairweather", "Galloway", "Hartigan",
              "Ivers", "Jessop", "Kettleby", "Lindqvist", "Marchbank", "Northcott", "Okonkwo", "Pellegrin", "Quayle",
              "Rosseter", "Stroud", "Thorne", "Underhill", "Vantongeren", "Whitlock", "Yardley")
TOWNS = ("Port Elsmere", "Vardenholm", "Kilbrannan", "Ostrava Nova", "Millhaven", "Tresk", "Caldwick", "Lindenmoor",
         "Saltmarrow", "Halvik", "Drumcarrow", "Ellesford", "Marrowgate", "Quillon", "Ravensworth", "Thistlebrook")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
HIDING_OBJECTS = ("flowerpot", "doormat", "loose brick", "birdhouse", "rain barrel", "garden gnome", "drainpipe",
                  "woodpile")
HIDING_COLOURS = ("green", "yellow", "cracked", "rusty", "painted", "crooked", "mossy", "broken")
MOTTO_WORDS = (("patient", "restless", "silent", "golden", "hungry", "gentle", "distant", "stubborn"),
               ("rivers", "lanterns", "engines", "orchards", "sparrows", "glaciers", "ladders", "compasses"),
               ("never", "always", "rarely", "quietly", "slowly", "boldly"),
               ("sleep", "wander", "forget", "return", "listen", "burn", "bend", "drift"))
PASSWORD_PUNCTUATION = "#!-_@$%&*+?"


def subjects() -> list[str]:
    """Every subject a fact can be about: 'the <adjective> <noun>'."""
    return [f"the {a} {n}" for a in ADJECTIVES for n in NOUNS]


def person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"


def _digits(n: int) -> Callable[[random.Random], str]:
    return lambda rng: str(rng.randint(10 ** (n - 1), 10**n - 1))


def _date(rng: random.Random) -> str:
    return f"{rng.randint(1, 28)} {rng.choice(MONTHS)} {rng.randint(2031, 2089)}"


def _time(rng: random.Random) -> str:
    return f"{rng.randint(1, 12)}:{rng.randrange(0, 60, 5):02d} {rng.choice(('am', 'pm'))}"


def _password(rng: random.Random) -> str:
    """Ten characters: letters of both cases, digits and at least two punctuation marks (never a period)."""
    chars = [rng.choice(string.ascii_letters) for _ in range(5)] + [rng.choice(string.digits) for _ in range(3)]
    chars += [rng.choice(PASSWORD_PUNCTUATION) for _ in range(2)]
    rng.shuffle(chars)
    if not chars[0].isalnum():  # a mark first reads as the sentence's punctuation
        first = next(i for i, c in enumerate(chars) if c.isalnum())
        chars[0], chars[first] = chars[first], chars[0]
    return "".join(chars)


def _hiding_place(rng: random.Random) -> str:
    return f"under the {rng.choice(HIDING_COLOURS)} {rng.choice(HIDING_OBJECTS)}"


def _motto(rng: random.Random) -> str:
    return " ".join(rng.choice(words) for words in MOTTO_WORDS)


@dataclass(frozen=True)
class Form:
    """A fact template, its question and how its value is drawn."""

    name: str
    fact: str  # with {subject} and {value}
    question: str  # with {subject}
    value: Callable[[random.Random], str]
    verbatim: bool = False  # scored on the exact characters (case and punctuation count)

    def sentence(self, subject: str, value: str) -> str:
        return _capital(self.fact.format(subject=subject, value=value))

    def ask(self, subject: str) -> str:
        return self.question.format(subject=subject)


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


FORMS: tuple[Form, ...] = (
    Form("code3", "The locker code of {subject} is {value}.", "What is the locker code of {subject}?", _digits(3)),
    Form("magic5", "The special magic number for {subject} is {value}.",
         "What is the special magic number for {subject}?", _digits(5)),
    Form("serial9", "The serial number stamped on the door of {subject} is {value}.",
         "What is the serial number stamped on the door of {subject}?", _digits(9)),
    Form("name", "{subject} was designed by an architect named {value}.", "Who designed {subject}?", person),
    Form("place", "The spare key to {subject} is hidden {value}.", "Where is the spare key to {subject} hidden?",
         _hiding_place),
    Form("town", "The keeper of {subject} retired to a town called {value}.",
         "To which town did the keeper of {subject} retire?", lambda rng: rng.choice(TOWNS)),
    Form("date", "{subject} will reopen on {value}.", "On what date will {subject} reopen?", _date),
    Form("time", "The night tour of {subject} starts at {value}.", "At what time does the night tour of {subject} start?",
         _time),
    Form("password", "The password for the alarm of {subject} is {value}.",
         "What is the password for the alarm of {subject}?", _password, verbatim=True),
    Form("motto", "The motto carved above the gate of {subject} is '{value}'.",
         "What is the motto carved above the gate of {subject}?", _motto),
)
FORMS_BY_NAME = {form.name: form for form in FORMS}
