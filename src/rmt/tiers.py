"""Tier ids shared by scoring, sampling and evaluation (stored as int8 beside every token)."""

NTP_ONLY, EASY, MEDIUM, HARD = 0, 1, 2, 3
RL_TIERS = (EASY, MEDIUM, HARD)
TIER_NAMES = {NTP_ONLY: "ntp_only", EASY: "easy", MEDIUM: "medium", HARD: "hard"}
