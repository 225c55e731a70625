"""Writes qa.jsonl: a small synthetic multi-hop QA set (fictional facts, written for this project).

Each record follows the native SoLoPO input schema (docs/generation.md): question, answers, and
paragraphs with title, text and is_supporting (two supporting passages, three distractors).
Run: python examples/generation/make_qa.py  (rewrites qa.jsonl beside this file)."""
import json
from pathlib import Path

# (id, question, answers, [supporting (title, text)], [distractor (title, text)])
RECORDS = [
    ("q01", "In which town was the composer of the symphony Winter Harbour born?", ["Talvik"],
     [("Winter Harbour", "Winter Harbour is a symphony in four movements written by the composer Ilse Marten in 1948. It was first performed by the Northern Radio Orchestra."),
      ("Ilse Marten", "Ilse Marten was a composer and organist. She was born in the fishing town of Talvik in 1911 and studied music in the capital.")],
     [("Northern Radio Orchestra", "The Northern Radio Orchestra was founded in 1936 and gives about forty concerts each year, most of them broadcast live."),
      ("Organ building", "Organ building is the craft of designing and making pipe organs. A large organ may contain several thousand pipes."),
      ("Symphony", "A symphony is an extended piece of music for orchestra, usually in four movements, one of which is often fast.")]),
    ("q02", "What river flows under the bridge designed by the engineer who built the Harlow Tower?", ["Venn River", "Venn"],
     [("Harlow Tower", "The Harlow Tower is a steel observation tower completed in 1962 to a design by the engineer Petra Lund."),
      ("Lund Bridge", "The Lund Bridge, designed by Petra Lund, carries a railway line across the Venn River near the town of Marport.")],
     [("Marport", "Marport is a market town known for its cattle fair, which has been held every autumn since the fourteenth century."),
      ("Steel construction", "Steel frames allow tall buildings to be built quickly, because the frame carries the weight of the walls."),
      ("Railway signalling", "Railway signalling keeps trains apart by dividing the line into blocks that only one train may occupy at a time.")]),
    ("q03", "Which animal is shown on the flag of the country where the Ostra Lakes lie?", ["heron", "a white heron"],
     [("Ostra Lakes", "The Ostra Lakes are a chain of seven shallow lakes in the south of the Republic of Velmar."),
      ("Flag of Velmar", "The flag of the Republic of Velmar shows a white heron on a green field, a symbol of its many wetlands.")],
     [("Wetland birds", "Many wading birds feed in shallow water, where they catch fish and frogs with long, pointed bills."),
      ("Lake formation", "Most lakes in lowland areas formed at the end of the last ice age, when glaciers left hollows in the ground."),
      ("National anthems", "A national anthem is a patriotic song adopted by a country as an expression of its identity.")]),
    ("q04", "What instrument did the founder of the Carrow Music School play?", ["cello"],
     [("Carrow Music School", "The Carrow Music School was founded in 1894 by Edwin Hale, who wanted to give free lessons to the children of mill workers."),
      ("Edwin Hale", "Edwin Hale was a cellist who played in the city orchestra for thirty years before he opened his school.")],
     [("Textile mills", "Textile mills employed thousands of workers in the nineteenth century, many of them children."),
      ("City orchestra", "The city orchestra performs in the old corn exchange, which was converted into a concert hall in 1921."),
      ("Music education", "Music lessons in schools became common in the twentieth century, often starting with singing and recorders.")]),
    ("q05", "In what year did the ship named after the founder of Port Ellis sink?", ["1887"],
     [("Port Ellis", "Port Ellis is a harbour town founded in 1790 by the merchant Samuel Ellis, who traded in timber and salt."),
      ("SS Samuel Ellis", "The steamship Samuel Ellis, named after the founder of Port Ellis, struck a rock and sank off the northern cape in 1887.")],
     [("Salt trade", "Salt was once so valuable that it was used to preserve fish and meat for long voyages and was taxed heavily."),
      ("Northern cape", "The northern cape is a headland of high cliffs where strong currents meet, known for its colonies of puffins."),
      ("Steamships", "Steamships replaced sailing ships on most trade routes during the second half of the nineteenth century.")]),
    ("q06", "Which language is spoken in the valley where the Brennic cheese is made?", ["Ladish"],
     [("Brennic cheese", "Brennic is a hard cheese made from goat milk in the Orsa Valley and aged in caves for at least a year."),
      ("Orsa Valley", "The people of the Orsa Valley speak Ladish, a language related to the dialects of the neighbouring mountains.")],
     [("Cheese making", "Cheese is made by curdling milk, separating the curds from the whey, and pressing and ageing the curds."),
      ("Goats", "Goats are hardy animals that can graze on steep slopes where cattle cannot climb."),
      ("Caves", "Limestone caves keep a nearly constant temperature all year, which makes them useful for storing food.")]),
    ("q07", "What is the name of the telescope at the observatory founded by Clara Voss?", ["Meridian"],
     [("Clara Voss", "Clara Voss was an astronomer who founded the Hallen Observatory in 1905 with money left to her by her father."),
      ("Hallen Observatory", "The main instrument of the Hallen Observatory is a refracting telescope called the Meridian, with a lens sixty centimetres wide.")],
     [("Refracting telescopes", "A refracting telescope uses a lens to gather light, while a reflecting telescope uses a curved mirror."),
      ("Comets", "Comets are small icy bodies that develop glowing tails when their orbits bring them close to the sun."),
      ("Star charts", "Star charts map the positions of stars and help observers find faint objects in the night sky.")]),
    ("q08", "Which sport did the winner of the 1931 Kessel Prize play professionally?", ["rugby"],
     [("Kessel Prize", "The Kessel Prize is awarded each year to a writer of sports journalism; the 1931 prize went to Arne Dahl."),
      ("Arne Dahl", "Before he became a journalist, Arne Dahl played rugby professionally for eight seasons in the coastal league.")],
     [("Sports journalism", "Sports journalism reports on games and athletes, and it grew quickly with the spread of daily newspapers."),
      ("Coastal league", "The coastal league was a regional competition whose teams came from the ports along the western shore."),
      ("Literary prizes", "Literary prizes reward books or writers and are often announced at a ceremony each autumn.")]),
    ("q09", "What colour are the trams in the city where the Sorin Library stands?", ["yellow"],
     [("Sorin Library", "The Sorin Library is a public library in the city of Gelda, built in 1910 with a glass reading room."),
      ("Trams of Gelda", "The trams of Gelda are painted yellow, and six lines connect the old town with the suburbs.")],
     [("Public libraries", "Public libraries lend books for free and often offer reading rooms, computers and children's events."),
      ("Glass architecture", "Iron and glass buildings became popular in the nineteenth century for stations, markets and greenhouses."),
      ("Suburbs", "Suburbs grew around many cities once trams and trains made it easy to travel to work in the centre.")]),
    ("q10", "Which crop is grown on the island where the poet Mira Tell lived?", ["saffron"],
     [("Mira Tell", "The poet Mira Tell spent the last twenty years of her life on the island of Skerra, where she wrote her best known poems."),
      ("Skerra", "Skerra is a small island whose farmers grow saffron on terraces above the harbour.")],
     [("Poetry", "Poetry uses rhythm, sound and imagery to express ideas and feelings, often in a compact form."),
      ("Terrace farming", "Terrace farming cuts steps into hillsides so that crops can be grown on steep ground without losing the soil."),
      ("Harbours", "A harbour is a sheltered stretch of water where ships can anchor safely during storms.")]),
]


def main() -> None:
    out = Path(__file__).with_name("qa.jsonl")
    with open(out, "w", encoding="utf-8") as f:
        for rid, question, answers, support, distract in RECORDS:
            paragraphs = [{"title": t, "text": x, "is_supporting": True} for t, x in support]
            paragraphs += [{"title": t, "text": x, "is_supporting": False} for t, x in distract]
            f.write(json.dumps({"id": rid, "question": question, "answers": answers, "paragraphs": paragraphs}) + "\n")
    print(f"wrote {len(RECORDS)} records to {out}")


if __name__ == "__main__":
    main()
