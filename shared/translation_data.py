"""A small built-in translation data set, written by this project (offline, no licence questions).

Plain data, no logic beyond splitting. Simple everyday sentences in English, German and French:

- MONOLINGUAL[lang]: source sentences WITHOUT references, the training data of a reference-free method
  (SSR-Zero trains on monolingual text only): 96 English, 32 German, 32 French sentences.
- PARALLEL: 48 (English, German, French) triples with references written by the project; the first
  16 are the dev split, the other 32 the test split (`parallel_split`). No sentence of PARALLEL
  occurs in MONOLINGUAL (tests/test_ssr_zero.py checks this), so both splits are held out.

The references are one acceptable translation each, written by a non-professional; chrF against a
single reference under-rates valid paraphrases, which is one more reason to compare a model only
with itself (before / after) on these sentences.
"""

from __future__ import annotations

LANGUAGES = {"en": "English", "de": "German", "fr": "French"}

MONOLINGUAL: dict[str, list[str]] = {
    "en": [
        "The sun rises in the east.", "My brother plays the guitar every evening.", "We need more bread and milk.",
        "The train leaves at seven o'clock.", "She reads a book in the garden.", "It is raining again today.",
        "The children are playing in the park.", "Can you help me with this box?", "The museum is closed on Mondays.",
        "I forgot my umbrella at home.", "He drinks tea without sugar.", "The shop opens at nine.",
        "Our neighbours have a big dog.", "The soup is too hot.", "Please close the window.",
        "They travelled to Spain last summer.", "The teacher writes on the board.", "I am learning to swim.",
        "The bus is late this morning.", "My grandmother bakes a cake every Sunday.", "Where is the nearest pharmacy?",
        "The flowers need water.", "We watched a film yesterday.", "The street is very quiet at night.",
        "He has two sisters and one brother.", "The apples are red and sweet.", "I will call you tomorrow.",
        "The library has many old books.", "She works in a hospital.", "The river is wide and deep.",
        "Do you speak English?", "The room is small but bright.", "My phone is broken.",
        "We are going to the beach.", "The coffee smells good.", "The cat jumps onto the table.",
        "It is cold in winter.", "He lost his keys again.", "The doctor is very friendly.",
        "I like to walk in the forest.", "The concert starts at eight.", "Her new car is blue.",
        "The baby is sleeping now.", "We eat dinner at six.", "The mountains are covered with snow.",
        "Please speak more slowly.", "The bakery sells fresh bread.", "My friend lives in Berlin.",
        "The lesson was very interesting.", "He is waiting for the bus.", "The door is open.",
        "I have a headache.", "The birds sing in the morning.", "She bought a new dress.",
        "The kitchen is clean.", "We play football on Saturdays.", "The water is clear and cold.",
        "My father repairs old bicycles.", "The market is busy today.", "I don't understand the question.",
        "The hotel is near the station.", "They are building a new school.", "The moon is bright tonight.",
        "She sends a letter to her aunt.", "The car is in the garage.", "I prefer green tea.",
        "The meeting is cancelled.", "The dog sleeps under the bed.", "He speaks three languages.",
        "We need a bigger table.", "The film was too long.", "My sister studies medicine.",
        "The garden is full of roses.", "It is already late.", "The children are hungry.",
        "The plane lands in Paris.", "I wash the dishes after lunch.", "The shoes are too small.",
        "He runs in the park every morning.", "The price is too high.", "Our house has a red roof.",
        "She is afraid of spiders.", "The computer is very slow.", "We visited our grandparents.",
        "The wind is strong today.", "I am reading the newspaper.", "The cake is on the table.",
        "The students are writing an exam.", "He opened the letter.", "The lake is frozen.",
        "My mother grows tomatoes.", "The city is beautiful in spring.", "I need a new pen.",
        "The farmer feeds the cows.", "We are tired after the trip.", "The picture hangs on the wall.",
    ],
    "de": [
        "Der Himmel ist heute wolkig.", "Ich trinke morgens immer Kaffee.", "Mein Onkel wohnt auf dem Land.",
        "Die Kinder gehen zur Schule.", "Das Essen ist fertig.", "Wir fahren morgen nach Hamburg.",
        "Der Hund bellt laut.", "Sie kauft Obst auf dem Markt.", "Das Fenster ist schmutzig.",
        "Ich suche meine Brille.", "Der Zug hat Verspätung.", "Er liest gern Krimis.",
        "Der Kuchen schmeckt gut.", "Im Sommer ist es warm.", "Das Kino ist sehr voll.",
        "Meine Schwester tanzt gern.", "Der Apfel liegt auf dem Tisch.", "Wir brauchen neue Stühle.",
        "Das Wasser im See ist zu kalt.", "Er arbeitet in einer Bank.", "Die Katze schläft im Korb.",
        "Ich habe keine Zeit.", "Der Park ist groß.", "Sie singt im Chor.",
        "Das Buch ist spannend.", "Wir spielen heute Karten.", "Die Straße ist nass.",
        "Mein Bruder kocht gern.", "Die Bäckerei ist geschlossen.", "Ich lerne Französisch.",
        "Die Tulpen sind gelb.", "Der Schlüssel ist weg.",
    ],
    "fr": [
        "Le ciel est bleu ce matin.", "Je mange une pomme.", "Mon père travaille à la gare.",
        "Les enfants dorment déjà.", "La maison est très grande.", "Nous allons au cinéma ce soir.",
        "Le chien court dans le jardin.", "Elle achète du pain.", "La porte est fermée.",
        "Je cherche mon téléphone.", "Le bus est en retard.", "Il aime la musique classique.",
        "La salade est froide.", "En hiver il neige souvent.", "Le restaurant est plein.",
        "Ma cousine habite à Lyon.", "Le livre est sur la chaise.", "Nous avons besoin de sel.",
        "L'eau est chaude.", "Il joue du piano.", "Le chat boit du lait.",
        "Je n'ai pas faim.", "La ville est calme.", "Elle écrit un poème.",
        "Le film est drôle.", "Nous marchons au bord de la mer.", "La route est longue.",
        "Mon ami parle allemand.", "La boulangerie ouvre à sept heures.", "J'apprends l'anglais.",
        "Les arbres sont verts.", "Le train arrive bientôt.",
    ],
}

PARALLEL: list[tuple[str, str, str]] = [  # (English, German, French)
    ("The cat is sleeping on the sofa.", "Die Katze schläft auf dem Sofa.", "Le chat dort sur le canapé."),
    ("I would like a cup of coffee.", "Ich hätte gern eine Tasse Kaffee.", "Je voudrais une tasse de café."),
    ("The weather is nice today.", "Das Wetter ist heute schön.", "Il fait beau aujourd'hui."),
    ("My sister lives in London.", "Meine Schwester wohnt in London.", "Ma sœur habite à Londres."),
    ("We are eating in the kitchen.", "Wir essen in der Küche.", "Nous mangeons dans la cuisine."),
    ("The book is on the table.", "Das Buch liegt auf dem Tisch.", "Le livre est sur la table."),
    ("He goes to work by bike.", "Er fährt mit dem Fahrrad zur Arbeit.", "Il va au travail à vélo."),
    ("The water is very cold.", "Das Wasser ist sehr kalt.", "L'eau est très froide."),
    ("I have two children.", "Ich habe zwei Kinder.", "J'ai deux enfants."),
    ("The shop is closed today.", "Der Laden ist heute geschlossen.", "Le magasin est fermé aujourd'hui."),
    ("Where is the station?", "Wo ist der Bahnhof?", "Où est la gare ?"),
    ("She drinks a glass of water.", "Sie trinkt ein Glas Wasser.", "Elle boit un verre d'eau."),
    ("The house has a small garden.", "Das Haus hat einen kleinen Garten.", "La maison a un petit jardin."),
    ("My friend is a doctor.", "Mein Freund ist Arzt.", "Mon ami est médecin."),
    ("The children are playing outside.", "Die Kinder spielen draußen.", "Les enfants jouent dehors."),
    ("I am learning German.", "Ich lerne Deutsch.", "J'apprends l'allemand."),
    # ---- test split from here
    ("The dog is hungry.", "Der Hund hat Hunger.", "Le chien a faim."),
    ("We live in a small town.", "Wir wohnen in einer kleinen Stadt.", "Nous habitons dans une petite ville."),
    ("The bread is fresh.", "Das Brot ist frisch.", "Le pain est frais."),
    ("He reads the newspaper every morning.", "Er liest jeden Morgen die Zeitung.", "Il lit le journal tous les matins."),
    ("The car is red.", "Das Auto ist rot.", "La voiture est rouge."),
    ("My mother works in a school.", "Meine Mutter arbeitet in einer Schule.", "Ma mère travaille dans une école."),
    ("It is very hot in summer.", "Im Sommer ist es sehr heiß.", "Il fait très chaud en été."),
    ("The train is late.", "Der Zug ist spät.", "Le train est en retard."),
    ("I do not like fish.", "Ich mag keinen Fisch.", "Je n'aime pas le poisson."),
    ("The window is open.", "Das Fenster ist offen.", "La fenêtre est ouverte."),
    ("She has a black cat.", "Sie hat eine schwarze Katze.", "Elle a un chat noir."),
    ("We go to the cinema on Friday.", "Am Freitag gehen wir ins Kino.", "Nous allons au cinéma vendredi."),
    ("The flowers are beautiful.", "Die Blumen sind schön.", "Les fleurs sont belles."),
    ("My father is tall.", "Mein Vater ist groß.", "Mon père est grand."),
    ("The tea is too sweet.", "Der Tee ist zu süß.", "Le thé est trop sucré."),
    ("I am looking for my keys.", "Ich suche meine Schlüssel.", "Je cherche mes clés."),
    ("The baby is crying.", "Das Baby weint.", "Le bébé pleure."),
    ("They are drinking wine.", "Sie trinken Wein.", "Ils boivent du vin."),
    ("The room is dark.", "Das Zimmer ist dunkel.", "La chambre est sombre."),
    ("He is writing a letter.", "Er schreibt einen Brief.", "Il écrit une lettre."),
    ("The city has a big park.", "Die Stadt hat einen großen Park.", "La ville a un grand parc."),
    ("I need a new phone.", "Ich brauche ein neues Handy.", "J'ai besoin d'un nouveau téléphone."),
    ("The students are in the classroom.", "Die Schüler sind im Klassenzimmer.", "Les élèves sont dans la salle de classe."),
    ("We visit our grandmother on Sunday.", "Am Sonntag besuchen wir unsere Großmutter.", "Nous rendons visite à notre grand-mère dimanche."),
    ("The soup is good.", "Die Suppe ist gut.", "La soupe est bonne."),
    ("She is singing a song.", "Sie singt ein Lied.", "Elle chante une chanson."),
    ("The bus stops here.", "Der Bus hält hier.", "Le bus s'arrête ici."),
    ("My brother is ten years old.", "Mein Bruder ist zehn Jahre alt.", "Mon frère a dix ans."),
    ("The sky is grey.", "Der Himmel ist grau.", "Le ciel est gris."),
    ("I often walk in the forest.", "Ich gehe oft im Wald spazieren.", "Je me promène souvent dans la forêt."),
    ("The restaurant opens at noon.", "Das Restaurant öffnet um zwölf Uhr.", "Le restaurant ouvre à midi."),
    ("He has a new computer.", "Er hat einen neuen Computer.", "Il a un nouvel ordinateur."),
]

N_DEV = 16  # PARALLEL[:N_DEV] is dev, PARALLEL[N_DEV:] is test


def parallel_split(split: str) -> list[dict[str, str]]:
    """The dev or test split as a list of {"en": ..., "de": ..., "fr": ...}."""
    rows = {"dev": PARALLEL[:N_DEV], "test": PARALLEL[N_DEV:]}[split]
    return [dict(zip(("en", "de", "fr"), row)) for row in rows]
