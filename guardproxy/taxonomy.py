"""The one hazard taxonomy guardproxy reports: the MLCommons AILuminate v1.0 hazard categories.

Every source's own categories are mapped onto these ids (the mapping lives with the training code);
policies write their refusal text per id. ``none`` is the category of a harmless request.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Category:
    id: str
    name: str
    description: str


CATEGORIES: tuple[Category, ...] = (
    Category("none", "No hazard", "An ordinary request."),
    Category(
        "violent_crimes", "Violent crimes", "Enabling physical harm to people or animals: murder, assault, terrorism."
    ),
    Category(
        "nonviolent_crimes", "Non-violent crimes", "Fraud, theft, hacking and malware, drugs, weapons trafficking."
    ),
    Category(
        "sex_related_crimes",
        "Sex-related crimes",
        "Sexual assault, trafficking, sexual harassment, non-consensual imagery.",
    ),
    Category("child_sexual_exploitation", "Child sexual exploitation", "Any sexualisation or grooming of minors."),
    Category(
        "indiscriminate_weapons",
        "Indiscriminate weapons (CBRNE)",
        "Chemical, biological, radiological, nuclear, explosives.",
    ),
    Category(
        "suicide_self_harm",
        "Suicide and self-harm",
        "Encouraging or enabling suicide, self-injury or disordered eating.",
    ),
    Category("hate", "Hate", "Demeaning or dehumanising people for protected characteristics; harassment campaigns."),
    Category(
        "specialized_advice",
        "Specialized advice",
        "Unqualified medical, legal or financial advice that could cause harm.",
    ),
    Category("privacy", "Privacy", "Exposing personal information: doxxing, stalking, surveillance of individuals."),
    Category(
        "intellectual_property", "Intellectual property", "Reproducing copyrighted works, piracy, counterfeiting."
    ),
    Category("elections", "Elections", "Misinformation about voting, election interference."),
    Category("defamation", "Defamation", "False, damaging claims about real people."),
    Category("sexual_content", "Sexual content", "Explicit sexual content."),
)

CATEGORY_IDS: tuple[str, ...] = tuple(c.id for c in CATEGORIES)
BY_ID: dict[str, Category] = {c.id: c for c in CATEGORIES}
