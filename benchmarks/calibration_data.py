"""Real inputs for benchmarks/bench_calibration.py, each split into calibration and evaluation halves.

- OCR: text crops cut from skimage.data.page() (a photographed book page) and text()
  (handwritten formulas). The page's seven text lines are split between the two halves by
  line, so no pixel of an evaluation crop was seen during calibration.
- MiniLM: 64 English sentences written for this benchmark, alternating between the halves.
"""
from __future__ import annotations

import math

import numpy as np

# Rows (y0, y1) of page()'s text lines, read from its ink profile: the title, five lines of
# body text and one line of code (the rule between them carries no text). The page is a
# little slanted, so each band is a few pixels taller than the letters.
PAGE_LINES = [(8, 37), (45, 68), (63, 85), (81, 103), (99, 121), (117, 140), (166, 190)]
CALIB_LINES = (0, 2, 4, 6)  # title, two body lines, code
EVAL_LINES = (1, 3, 5)  # three body lines
# text(): the handwritten boxes of benchmarks/real_fidelity.py, alternating between the halves.
TEXT_BOXES = [(0, 50, 110, 100), (100, 20, 290, 95), (55, 115, 290, 172), (300, 40, 448, 125)]


def _windows(image: np.ndarray, band: tuple[int, int], aspect: float, stride: float) -> list[np.ndarray]:
    """Crops of one text line: windows `aspect` line heights wide, every `stride` heights."""
    y0, y1 = band
    height = y1 - y0
    width, step = round(aspect * height), max(1, round(stride * height))
    return [image[y0:y1, x0:x0 + width] for x0 in range(0, image.shape[1] - width + 1, step)]


def ocr_crops(aspect: float, stride: float) -> dict[str, list[np.ndarray]]:
    """{'calib': [...], 'eval': [...]} grey crops (uint8 2-D) of page() lines and text() boxes."""
    from skimage import data

    page, text = data.page(), data.text()
    split = {"calib": [], "eval": []}
    for index, band in enumerate(PAGE_LINES):
        half = "calib" if index in CALIB_LINES else "eval"
        split[half] += _windows(page, band, aspect, stride)
    for index, (x0, y0, x1, y1) in enumerate(TEXT_BOXES):
        split["calib" if index % 2 == 0 else "eval"].append(text[y0:y1, x0:x1])
    return split


def paddle_input(crop: np.ndarray, height: int, width: int) -> np.ndarray:
    """PaddleOCR's cls/rec preprocessing: height fixed keeping the aspect ratio (width capped),
    grey to 3 channels, (x/255 - 0.5)/0.5, zero padding on the right. Returns [3, height, width]
    and, as a second value, the width the crop fills."""
    from skimage.transform import resize

    filled = min(width, math.ceil(height * crop.shape[1] / crop.shape[0]))
    scaled = resize(crop.astype(np.float32), (height, filled), order=1, preserve_range=True, anti_aliasing=True)
    x = np.zeros((3, height, width), np.float32)
    x[:, :, :filled] = (scaled / 255.0 - 0.5) / 0.5
    return x, filled


# Short and long, questions and statements, many topics; none repeats real_fidelity's.
SENTENCES = [
    "The bakery on the corner opens at six every morning.",
    "Can you send me the report before Friday?",
    "Volcanic ash grounded flights across northern Europe for almost a week.",
    "He forgot his umbrella again.",
    "The new library has a rooftop garden where students read in the summer.",
    "Why does the sky turn red at sunset?",
    "Our team lost the final on penalties after a goalless draw.",
    "Add the flour slowly and stir until the batter is smooth.",
    "The senator resigned after the investigation found irregular payments.",
    "Thank you for your help yesterday.",
    "Wolves were reintroduced to the park in the nineties and changed the behaviour of the elk.",
    "Which platform does the next train to Leeds leave from?",
    "The patient's blood pressure returned to normal within an hour.",
    "I would rather walk than wait for the bus in this traffic.",
    "Solar panels on the school roof now cover most of its electricity.",
    "Good night.",
    "The orchestra rehearsed the symphony for three weeks before the premiere.",
    "My laptop battery drains faster since the last update.",
    "Ancient Romans used concrete that hardened even under sea water.",
    "Where did you park the car?",
    "The startup raised twelve million dollars to build cheaper batteries.",
    "Children under twelve travel free on weekends.",
    "She painted the kitchen a pale shade of green.",
    "A sudden frost destroyed most of the apple blossoms in the valley.",
    "Please close the window, it is getting cold.",
    "The detective noticed that the clock in the hall had stopped at midnight.",
    "Drinking enough water helps the body regulate its temperature.",
    "The museum's new exhibition explores the history of printing.",
    "Is there a pharmacy open late near here?",
    "The river burst its banks and flooded dozens of homes overnight.",
    "He practised the speech in front of the mirror until he knew it by heart.",
    "Prices for second-hand cars have risen sharply this year.",
    "The cat sleeps on the warm windowsill all afternoon.",
    "Engineers are testing a bridge design that bends in strong winds.",
    "What time does the match start?",
    "The hospital hired forty nurses to shorten waiting times.",
    "Octopuses can change colour in a fraction of a second.",
    "We should book the hotel before the festival fills the town.",
    "The software crashes whenever the file name contains a space.",
    "Her first novel was translated into nineteen languages.",
    "Turn left at the church and the post office is on your right.",
    "Heavy snow closed the mountain pass for the rest of the season.",
    "The council voted to turn the old factory into affordable flats.",
    "I cannot find my keys anywhere.",
    "Migrating birds use the earth's magnetic field to find their way.",
    "The recipe calls for two eggs, a cup of sugar and a pinch of salt.",
    "Stock markets in Asia fell after the announcement.",
    "Would you like tea or coffee?",
    "The glacier has retreated more than a kilometre in the last fifty years.",
    "Our neighbours are building an extension at the back of their house.",
    "The teacher asked the class to summarise the chapter in one paragraph.",
    "Lightning struck the old oak tree during the night.",
    "Remote work has changed how cities plan public transport.",
    "The doctor recommended rest and plenty of fluids.",
    "Fireflies glow to attract mates on warm summer evenings.",
    "The printer on the second floor is out of paper again.",
    "Archaeologists found coins buried beneath the market square.",
    "How long does it take to learn a new language?",
    "The ferry was delayed by high waves and strong winds.",
    "A good night's sleep improves memory and concentration.",
    "The shop refunded the broken kettle without asking questions.",
    "Researchers trained a robot to fold laundry.",
    "Let's meet at the station at half past eight.",
    "The mayor promised to repair the potholes before winter.",
]
