"""Limitation periods for a few claim types (illustrative; check the statute before relying on it)."""

from __future__ import annotations

from typing import Literal

Claim = Literal["personal_injury", "written_contract", "oral_contract", "property_damage"]

# jurisdiction -> claim -> (years, source)
PERIODS: dict[str, dict[str, tuple[int, str]]] = {
    "US-CA": {
        "personal_injury": (2, "Cal. Code Civ. Proc. § 335.1"),
        "written_contract": (4, "Cal. Code Civ. Proc. § 337"),
        "oral_contract": (2, "Cal. Code Civ. Proc. § 339"),
        "property_damage": (3, "Cal. Code Civ. Proc. § 338"),
    },
    "US-NY": {
        "personal_injury": (3, "N.Y. CPLR § 214"),
        "written_contract": (6, "N.Y. CPLR § 213"),
        "oral_contract": (6, "N.Y. CPLR § 213"),
        "property_damage": (3, "N.Y. CPLR § 214"),
    },
    "UK-EW": {
        "personal_injury": (3, "Limitation Act 1980, s. 11"),
        "written_contract": (6, "Limitation Act 1980, s. 5"),
        "oral_contract": (6, "Limitation Act 1980, s. 5"),
        "property_damage": (6, "Limitation Act 1980, s. 2"),
    },
}


def limitation_period(claim: Claim, jurisdiction: str = "US-CA") -> dict[str, object]:
    """How long a claimant has to sue, for a claim type in a jurisdiction (US-CA, US-NY, UK-EW)."""
    table = PERIODS.get(jurisdiction)
    if table is None:
        raise ValueError(f"unknown jurisdiction {jurisdiction!r}; known: {', '.join(sorted(PERIODS))}")
    years, source = table[claim]
    return {"claim": claim, "jurisdiction": jurisdiction, "years": years, "source": source}
