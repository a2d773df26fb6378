"""16 prompts of different lengths (a few to ~300 tokens), written for these tests."""

_SENTENCES = [
    "The river rises in the northern hills and runs south through a wide valley of farms.",
    "In spring the melting snow swells it, and the old stone bridge at the market town is often closed.",
    "Millers built their wheels along its banks long before the railway reached the valley.",
    "Most of the mills are gone now, but the names of the lanes still remember them.",
    "A canal was dug beside the river in the eighteenth century to carry coal and grain.",
    "Its locks are kept by volunteers, who open them each summer for the small boats of visitors.",
    "Herons fish in the shallows, and on quiet evenings otters can be seen near the weir.",
    "The town library keeps a collection of maps that show how the course of the river has changed.",
    "One map from 1790 marks a ford where the bridge now stands, and an inn that has long since burned.",
    "Local historians argue about the date of the first bridge, which no document records.",
    "Some say the Romans crossed here; others think the crossing is no older than the abbey.",
    "The abbey itself stood on the rise above the eastern bank until its walls were taken for building stone.",
    "Today a school occupies the site, and its playing field covers what was once the cloister.",
    "Every autumn the school holds a race on the river, rowed in boats the pupils build themselves.",
    "The course runs from the weir to the bridge, a little under two miles with the current.",
    "Winners have their names painted on a board that hangs in the hall beside the old abbey door.",
]

PROMPTS = [
    "Hello",
    "The capital of France is",
    "Write a short poem about the sea:",
    "1, 2, 3, 4, 5,",
] + [" ".join(_SENTENCES[: 1 + 3 * k]) + " In short," for k in range(6)] + [
    " ".join(_SENTENCES[k:]) + " The next chapter describes" for k in (0, 3, 6, 9, 12, 14)
]
assert len(PROMPTS) == 16
