"""Generate ``support_prefs.jsonl``: a tiny customer-support preference dataset.

Deterministic (``random.Random(0)``), standard library only. Run from anywhere::

    python fastdpo/train/data/make_support_prefs.py

Each output line is one JSON object in TRL's explicit-prompt preference format::

    {"prompt": str, "chosen": str, "rejected": str, "split": "train" | "eval"}

Replies start with the space that separates them from the prompt (TRL tokenizes prompt + reply as one string).

Prompts are short customer messages built from templates x slots. ``chosen`` is a
polite, specific reply (acknowledges, gives steps that match the question, offers
follow-up). ``rejected`` is curt/dismissive, gives wrong or unsafe steps, or
answers a different question. The last prompt template of every topic is held out
for ``eval``, so eval prompts never appear verbatim in train.
"""

import json
import os
import random

SEED = 0
TRAIN_PER_TOPIC = 45
EVAL_PER_TOPIC = 5
MAX_PROMPT_WORDS = 25
MAX_REPLY_WORDS = 40
# Chosen replies are assembled to this budget (below the hard cap) so prompt +
# reply stays under ~96 tokens even for a ~1k-vocab BPE tokenizer.
CHOSEN_TARGET_WORDS = 36
OUT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "support_prefs.jsonl")

# ---------------------------------------------------------------- slot values
NAMES = ["Ana", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hugo", "Iris",
         "Jamal", "Kim", "Liam", "Maya", "Noah", "Olga", "Priya", "Quinn", "Rosa",
         "Sam", "Tara", "Umar", "Vera", "Will", "Yuki", "Zoe"]
PRODUCTS = ["blender", "desk lamp", "phone case", "headphones", "smart watch",
            "coffee maker", "backpack", "keyboard", "router", "air fryer",
            "tablet", "speaker", "camera", "kettle", "monitor", "vacuum",
            "toaster", "webcam", "charger", "mouse"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July",
          "August", "September", "October", "November", "December"]
PLANS = ["Plus", "Premium", "Family", "Pro", "Student", "Gold"]
AMOUNTS = ["$9.99", "$14.99", "$19.99", "$24.50", "$39.00", "$49.99", "$59.95",
           "$79.00", "$99.99", "$120.00"]
CODES = ["SAVE10", "WELCOME15", "SPRING20", "FREESHIP", "VIP25", "THANKS5", "SUMMER30"]
CITIES = ["Austin", "Denver", "Boston", "Seattle", "Chicago", "Miami", "Portland",
          "Phoenix", "Atlanta", "Dallas"]
# Powered products, for "will not turn on" style prompts; SCREENS have displays.
DEVICES = ["headphones", "smart watch", "coffee maker", "keyboard", "router",
           "air fryer", "tablet", "speaker", "camera", "kettle", "monitor",
           "vacuum", "toaster", "webcam", "blender"]
SCREENS = ["tablet", "smart watch", "monitor", "camera", "e-reader"]
COLORS = ["black", "white", "red", "blue", "green", "gray"]


def make_slots(rng):
    return {
        "name": rng.choice(NAMES),
        "product": rng.choice(PRODUCTS),
        "order": "#%d" % rng.randint(10000, 99999),
        "day": rng.choice(DAYS),
        "date": "%s %d" % (rng.choice(MONTHS), rng.randint(1, 28)),
        "plan": rng.choice(PLANS),
        "amount": rng.choice(AMOUNTS),
        "code": rng.choice(CODES),
        "city": rng.choice(CITIES),
        "color": rng.choice(COLORS),
        "device": rng.choice(DEVICES),
        "screen": rng.choice(SCREENS),
        "n": str(rng.randint(3, 10)),
    }


# ---------------------------------------------------------------- shared reply parts
# Courteous openers / closers keep "chosen" consistently polite; the per-template
# steps keep it specific to the question. Named openers are used only when the
# customer signed the message with their name.
OPENERS_NAMED = [
    "Thanks for reaching out, {name}, and sorry for the trouble.",
    "Sorry about this, {name}, I can help.",
    "Thank you for your patience, {name}.",
    "I am sorry for the hassle, {name}.",
    "Thanks for letting us know, {name}.",
    "Hi {name}, I understand how frustrating this is.",
    "Hi {name}, thanks for contacting us.",
    "Sorry to hear that, {name}, let us fix it.",
]
OPENERS_PLAIN = [
    "Thanks for reaching out, and sorry for the trouble.",
    "Sorry about this, I can help.",
    "Thank you for your patience.",
    "I am sorry for the hassle.",
    "Thanks for letting us know.",
    "I understand how frustrating this is.",
    "Thanks for contacting us.",
    "Sorry to hear that, let us fix it.",
]
CLOSERS = [
    "Let me know if you need anything else.",
    "Reply here if anything is unclear.",
    "Happy to help further if needed.",
    "Just reply if it still does not work.",
    "I will follow up if we need more details.",
    "Feel free to write back anytime.",
]

# Curt / dismissive rejections (shared by every topic).
CURT = [
    "Not our problem.",
    "Read the FAQ.",
    "We can't help with that.",
    "Try again later.",
    "Figure it out yourself.",
    "Nothing we can do.",
    "Check the website.",
    "Ask someone else.",
    "That is not our fault.",
    "Deal with it.",
    "No.",
    "Wait like everyone else.",
    "We are busy.",
    "Contact someone else.",
    "Not possible.",
    "Stop emailing us.",
    "Policy is policy.",
    "Whatever. Try later.",
    "Look it up.",
    "Can't do anything.",
]

# ---------------------------------------------------------------- topics
# prompts: (template, [matching helpful steps]); the LAST template is held out
#          for eval.
# wrong:   wrong or unsafe answers for this topic (used as rejected).
# offtopic: a terse answer to this topic's question (used as a mismatched
#           rejected reply for OTHER topics).
TOPICS = {
    "order_status": {
        "prompts": [
            ("Where is my order {order}? It was supposed to arrive on {day}.", [
                "Order {order} was delayed at the depot and should arrive within {n} days. I emailed you the tracking link.",
                "I checked order {order}. It is with the carrier now, and the updated tracking link is in your inbox.",
            ]),
            ("My {product} order {order} still has not shipped. What is going on?", [
                "Your {product} was back ordered. Order {order} ships tomorrow, and I will email tracking as soon as it leaves.",
                "I moved order {order} to priority packing, so your {product} ships within {n} days. Tracking follows by email.",
            ]),
            ("Can you tell me when order {order} will arrive?", [
                "Order {order} is scheduled to arrive on {day}. I emailed you the tracking link so you can follow it.",
                "I checked order {order}. It is out for delivery and should arrive within {n} days.",
            ]),
            ("Tracking for order {order} has not updated since {date}. Is it lost?", [
                "I asked the carrier to trace order {order}. If it is not found in {n} days, I will send a replacement.",
                "Order {order} looks stuck at the depot. I opened a trace with the carrier and will update you within 24 hours.",
            ]),
            ("I ordered a {product} on {date} and still have no tracking number.", [
                "Your {product} shipped yesterday. I just emailed you the tracking number and link.",
                "I found your {product} order from {date}. It ships today, and the tracking number will reach your email tonight.",
            ]),
        ],
        "wrong": [
            "Just place the order again.",
            "Orders never get delayed, so it must have arrived.",
            "Please send us your card number so we can check.",
            "Cancel it and buy from a store.",
        ],
        "offtopic": "Your order will arrive whenever it arrives.",
    },
    "refund": {
        "prompts": [
            ("I returned my {product} on {date}. When will I get my refund?", [
                "Your {product} return arrived, so I issued the refund today. It should reach your card within {n} business days.",
                "I see your return from {date}. The refund is approved and you will get a confirmation email shortly.",
            ]),
            ("Can I get a refund for order {order}? The {product} is not what I expected.", [
                "Yes. I emailed a prepaid return label for order {order}; once the {product} is scanned, the refund is sent.",
                "Of course. Please pack the {product} and use the return label I just emailed. The refund follows in {n} days.",
            ]),
            ("I want my money back for the {device}. It stopped working after {n} days.", [
                "I have started a full refund for the {device}. Please use the prepaid label I emailed to send it back.",
                "A faulty {device} qualifies for a full refund. I emailed you a return label, and the money follows once it arrives.",
            ]),
            ("My refund of {amount} for order {order} has not shown up yet.", [
                "I checked order {order}. The {amount} refund was sent today and banks usually show it within {n} days.",
                "The {amount} refund for order {order} was delayed, so I pushed it through again. You will get an email receipt.",
            ]),
            ("How long do refunds take for order {order}?", [
                "Refunds for order {order} take {n} business days after we receive the item. I will email you when it is sent.",
                "Once your return for order {order} arrives, the refund posts within {n} business days. I will keep you updated.",
            ]),
        ],
        "wrong": [
            "Refunds are only given as store credit, never money.",
            "Refunds take a year, please be patient.",
            "Send us your online banking password and we will deposit it.",
            "Just dispute it with your bank instead.",
        ],
        "offtopic": "Refunds go back to the original card.",
    },
    "password": {
        "prompts": [
            ("I forgot my password and cannot log in. Can you help?", [
                "Please click Forgot Password on the login page and follow the link we email you. Check your spam folder too.",
                "Use Forgot Password on the login page. We will email a reset link that works for one hour.",
            ]),
            ("The password reset email never arrives.", [
                "I sent a fresh reset link just now. Please check your spam folder, and add our address to your contacts.",
                "Please check spam and promotions folders. I have resent the reset link, and it works for one hour.",
            ]),
            ("How do I change my password? I think someone saw it.", [
                "Go to Settings, then Security, then Change Password. Choose a new one and sign out of other devices.",
                "Please change it now under Settings, then Security. Then choose Sign Out Everywhere to end other sessions.",
            ]),
            ("My reset link says expired every time I click it.", [
                "Reset links expire after one hour. I sent a new one, so please open the latest email and click it soon.",
                "Please request a new link and use only the newest email. Older links stop working once a new one is sent.",
            ]),
            ("I am locked out after too many password attempts since {day}.", [
                "I have unlocked your account. Use Forgot Password to set a new password, and never share it with anyone.",
                "The lock clears after one hour, but I removed it now. Please reset your password with Forgot Password.",
            ]),
        ],
        "wrong": [
            "Please reply with your current password in plain text so we can reset it.",
            "Just create a new account instead.",
            "Send us your password and email and we will log in for you.",
            "Passwords cannot be changed once set.",
        ],
        "offtopic": "Just use Forgot Password.",
    },
    "shipping_address": {
        "prompts": [
            ("I entered the wrong address for order {order}. Can I change it?", [
                "Order {order} has not shipped yet, so I updated the address for you. Please confirm it in the email I sent.",
                "Yes. Please reply with the correct address and I will update order {order} before it ships.",
            ]),
            ("I moved to {city}. How do I update my shipping address?", [
                "Go to Account, then Addresses, and add your {city} address as default. Future orders will ship there.",
                "Open Account, then Addresses, choose Add New, and set the {city} address as default.",
            ]),
            ("Please ship order {order} to my work address in {city} instead.", [
                "I asked the carrier to redirect order {order} to your {city} work address. You will get updated tracking by email.",
                "Done. Order {order} will now ship to your {city} work address, and I emailed you the confirmation.",
            ]),
            ("Can I change the delivery address after my {product} has shipped?", [
                "Yes, I can ask the carrier to redirect your {product}. Please reply with the new address and I will arrange it.",
                "Once shipped, we can request a carrier redirect. Send me the new address and I will file it for your {product}.",
            ]),
            ("My order {order} has an old address on it. Can you fix it?", [
                "I have changed the address on order {order}. Please check the confirmation email and reply if anything is wrong.",
                "Please reply with your current address, and I will update order {order} and your account default.",
            ]),
        ],
        "wrong": [
            "Addresses can never be changed, the package is lost.",
            "Just wait at the old address.",
            "Create a new account with the new address.",
            "Refuse the delivery and hope it comes back.",
        ],
        "offtopic": "Update your address in your account.",
    },
    "double_charge": {
        "prompts": [
            ("I was charged {amount} twice for order {order}. Please fix this.", [
                "I see the duplicate {amount} charge on order {order}. I have refunded it and it should clear within {n} days.",
                "I confirmed order {order} was billed twice and reversed the extra {amount}. A confirmation email is on its way.",
            ]),
            ("My card shows two charges from you on {date}. Why?", [
                "One of the {date} charges is a temporary hold that drops off in {n} days. I emailed you the details.",
                "I checked your {date} payments. The second charge was a duplicate, so I refunded it today.",
            ]),
            ("Why did you bill me {amount} when my {plan} plan is cheaper?", [
                "The {amount} included last month's upgrade. I emailed a breakdown, and future {plan} bills return to the normal price.",
                "That was a billing error on your {plan} plan. I refunded the difference and emailed you a corrected invoice.",
            ]),
            ("There is a charge of {amount} I do not recognize from {date}.", [
                "The {amount} charge on {date} was your yearly renewal. I emailed the receipt; if it looks wrong, I will refund it.",
                "I will look into the {amount} charge from {date}. Please reply with the last four card digits only.",
            ]),
            ("You charged me twice this month for my {plan} subscription.", [
                "I found the duplicate {plan} charge and refunded it. You should see it back on your card within {n} days.",
                "You are right, the {plan} plan billed twice. I reversed one charge and emailed you the receipt.",
            ]),
        ],
        "wrong": [
            "Please send your full card number and security code so we can check.",
            "Double charges are normal, you keep both.",
            "Just cancel your card.",
            "That charge is a tip for our team.",
        ],
        "offtopic": "Bills are sent on the first of the month.",
    },
    "subscription": {
        "prompts": [
            ("How do I cancel my {plan} subscription before it renews on {date}?", [
                "Go to Account, then Subscription, and click Cancel Plan. Your {plan} access stays active until {date}.",
                "Open Account, then Subscription, and choose Cancel. You will not be charged on {date}.",
            ]),
            ("I want to downgrade from {plan} to Basic. How do I do that?", [
                "Open Account, then Subscription, choose Change Plan, and pick Basic. The lower price starts next cycle.",
                "I can do that for you. I switched your {plan} plan to Basic, starting with your next billing date.",
            ]),
            ("Please stop my {plan} plan. I do not use it anymore.", [
                "I have cancelled your {plan} plan, so you will not be charged again. A confirmation email is on its way.",
                "Done. Your {plan} plan is cancelled and stays usable until the end of this cycle.",
            ]),
            ("Can I pause my {plan} subscription for a few months?", [
                "Yes. I paused your {plan} plan for {n} weeks. You can resume anytime from the Subscription page.",
                "Go to Account, then Subscription, and choose Pause. You can pause the {plan} plan for up to three months.",
            ]),
            ("My {plan} plan renewed on {date} but I cancelled. Why?", [
                "Your cancellation did not save, sorry. I cancelled the {plan} plan now and refunded the {date} renewal.",
                "I see the {date} renewal on your {plan} plan. I refunded it in full and confirmed the cancellation by email.",
            ]),
        ],
        "wrong": [
            "Subscriptions cannot be cancelled once started.",
            "Just block our emails and it stops.",
            "Delete the app and the plan cancels itself.",
            "Upgrade to Premium to cancel.",
        ],
        "offtopic": "Plans renew every month automatically.",
    },
    "broken_device": {
        "prompts": [
            ("My {device} arrived broken. What should I do?", [
                "Please send a photo of the damage, and I will ship a new {device} right away at no cost.",
                "I am sending a replacement {device} today. Use the prepaid label in your email to return the broken one.",
            ]),
            ("The {device} from order {order} will not turn on.", [
                "Please unplug the {device} for one minute, then try another outlet. If it still fails, I will replace it for free.",
                "Please try the {device} with a different outlet and cable. If it stays off, reply and I will send a replacement.",
            ]),
            ("My {device} stopped working after {n} days. Is it under warranty?", [
                "Yes, your {device} has a one year warranty. I emailed a prepaid label, and a replacement ships once it is scanned.",
                "It is covered. I have started a warranty claim and a new {device} ships within {n} days.",
            ]),
            ("The screen on my {screen} cracked the first week. Can you help?", [
                "Please send a photo of the crack. Early damage is covered, and I will ship a new {screen} right away.",
                "I am sorry it cracked so soon. I have arranged a free screen repair; a prepaid box is on its way.",
            ]),
            ("My new {device} keeps shutting off by itself.", [
                "Please plug the {device} into a wall outlet, not a power strip. If it still shuts off, I will replace it.",
                "Please check that the vents are clear and try another outlet. If the {device} still turns off, I will replace it.",
            ]),
        ],
        "wrong": [
            "Open it up and fix the wiring yourself.",
            "Put it in the oven to dry it out.",
            "Broken items are the customer's fault.",
            "Buy a new one, warranties are fake.",
        ],
        "offtopic": "Try turning it off and on.",
    },
    "account_deletion": {
        "prompts": [
            ("Please delete my account and all my data.", [
                "I have submitted your deletion request. You will get an email to confirm, and all data is removed within {n} days.",
                "Go to Settings, then Privacy, and choose Delete Account. Your data is erased within {n} days.",
            ]),
            ("How do I close my account?", [
                "Go to Settings, then Privacy, and choose Delete Account. We email a confirmation once it is closed.",
                "Open Settings, then Privacy, then Delete Account. Any active plan is cancelled at the same time.",
            ]),
            ("I want you to erase my personal information from your systems.", [
                "I started a full data erasure request. All records are removed within {n} days, and we will email you when done.",
                "Your erasure request is logged. We delete all personal data within {n} days and send a confirmation.",
            ]),
            ("Can I delete my account but keep my order {order} history?", [
                "Yes. Download your history from Settings, then Orders, first. Then choose Delete Account under Privacy.",
                "Please export your orders, including {order}, from Settings first. After that, Delete Account removes everything else.",
            ]),
            ("I want my account and data removed permanently.", [
                "I have started the permanent removal of your account. We will email you once every record is erased.",
                "Your account is scheduled for permanent deletion. All data is erased within {n} days, with an email confirmation.",
            ]),
        ],
        "wrong": [
            "We never delete any data.",
            "Send us your password so we can delete it for you.",
            "Just stop logging in and it deletes itself.",
            "Deleting an account costs {amount}.",
        ],
        "offtopic": "Go to Settings to update your profile.",
    },
    "wrong_item": {
        "prompts": [
            ("I ordered a {product} but received something else in order {order}.", [
                "I am shipping the correct {product} today at no charge. Keep the wrong item or donate it.",
                "I emailed a prepaid return label for the wrong item, and the right {product} ships within {n} days.",
            ]),
            ("Order {order} came with the wrong color {product}.", [
                "I am sending the {product} in the right color today. Use the prepaid label I emailed to return the other one.",
                "I swapped order {order} for the correct color. The new {product} ships today with free express delivery.",
            ]),
            ("The box for order {order} was missing my {product}.", [
                "I have sent the missing {product} from order {order} by express shipping. Tracking is in your email.",
                "I confirmed the {product} was left out of order {order}. A replacement ships today at no cost.",
            ]),
            ("You sent me two of the same item instead of a {product}.", [
                "Please keep one and return the other with the prepaid label I emailed. Your {product} ships today.",
                "I am shipping your {product} now. Use the prepaid label in your email to send back the extra item.",
            ]),
            ("My package for order {order} had someone else's items in it.", [
                "I am shipping your real order {order} today by express. Please use the prepaid label I emailed to return the items.",
                "I have reshipped order {order} to you. A prepaid return label for the other items is in your email.",
            ]),
        ],
        "wrong": [
            "You must have ordered the wrong thing.",
            "Pay {amount} for shipping and we will look into it.",
            "Keep it, we do not do exchanges.",
            "Order it again and pay twice.",
        ],
        "offtopic": "Your item shipped from our warehouse.",
    },
    "discount_code": {
        "prompts": [
            ("The code {code} does not work at checkout.", [
                "Please type {code} in capital letters with no spaces. If it still fails, I will apply it for you manually.",
                "I checked {code} and it is valid. Please clear your cart and re-add items, then enter it again.",
            ]),
            ("I forgot to use my {code} discount on order {order}. Can you apply it?", [
                "Yes. I applied {code} to order {order} and refunded the difference. You will see it within {n} days.",
                "No problem. I refunded the {code} discount on order {order} to your card.",
            ]),
            ("Why does {code} say expired? I got it on {date}.", [
                "{code} expired after {n} days, but I have emailed you a new code that works for the next week.",
                "That code ended early, sorry. I added a fresh code to your account that works until next month.",
            ]),
            ("Can I use {code} together with the sale price on the {product}?", [
                "{code} applies to full price items only. I added a {amount} credit to your account for the {product} instead.",
                "Codes do not stack with sales, but I added a {amount} credit you can use on the {product} now.",
            ]),
            ("My student discount is not showing up at checkout.", [
                "Please verify your student email under Account, then Discounts. The discount appears at checkout once verified.",
                "I verified your student status, so the discount now shows at checkout. Please refresh the page.",
            ]),
        ],
        "wrong": [
            "Codes are fake, pay full price.",
            "Send us your card details and we will apply it.",
            "Just try random codes until one works.",
            "Discounts only work on Tuesdays.",
        ],
        "offtopic": "Codes go in the box at checkout.",
    },
    "two_factor": {
        "prompts": [
            ("I got a new phone and cannot get my login codes anymore.", [
                "Please use one of your backup codes to sign in, then go to Security and add your new phone.",
                "I can reset two factor for you. After that, sign in and set it up on your new phone under Security.",
            ]),
            ("The two factor code never arrives by text.", [
                "Please check that your phone number is correct under Security. I also resent the code just now.",
                "Text codes can be slow. Wait one minute, then choose Resend Code, or switch to an authenticator app.",
            ]),
            ("My authenticator app says the code is wrong every time.", [
                "Please set your phone clock to automatic time. Wrong clocks cause bad codes. Then try a fresh code.",
                "Check that the app time is synced in its settings, then enter the newest code before it changes.",
            ]),
            ("How do I turn on two factor login for my account?", [
                "Go to Settings, then Security, and choose Enable Two Factor. Scan the QR code with your authenticator app.",
                "Open Settings, then Security, and turn on Two Factor. Save the backup codes somewhere safe.",
            ]),
            ("I lost my phone and cannot sign in anymore.", [
                "Please sign in with a backup code. If you have none, I will verify your identity and reset two factor.",
                "I sent an identity check to your email. Once it is done, I will reset your login codes so you can sign in.",
            ]),
        ],
        "wrong": [
            "Turn off all security and share your login with us.",
            "Text us your password and the code.",
            "Two factor is optional, just ignore it.",
            "Make a new account with no security.",
        ],
        "offtopic": "Use a stronger password.",
    },
    "invoice": {
        "prompts": [
            ("Can I get an invoice for order {order}? I need it for work.", [
                "I have emailed the invoice for order {order} as a PDF. You can also find it under Account, then Orders.",
                "Yes. Open Account, then Orders, and click Invoice next to {order}. I also emailed you a copy.",
            ]),
            ("I need a receipt for my {plan} subscription payment on {date}.", [
                "Go to Account, then Billing, and click Download next to the {date} payment. I also emailed you a copy.",
                "I emailed the receipt for your {plan} payment on {date}. All receipts are under Account, then Billing.",
            ]),
            ("My invoice for order {order} shows the wrong company name. Can you fix it?", [
                "I corrected the company name on order {order} and sent a new invoice. Reply if any other detail needs changing.",
                "Please reply with the right company name, and I will reissue the invoice for order {order} today.",
            ]),
            ("Where can I download invoices for my past orders?", [
                "Open Account, then Orders, and choose Invoice next to each order. I can send them by email too.",
                "All invoices are under Account, then Orders. Click Invoice to download a PDF for any order.",
            ]),
            ("Please send a VAT invoice for order {order}.", [
                "I emailed a VAT invoice for order {order}. If you need your VAT number on it, reply with it and I will reissue it.",
                "Your VAT invoice for order {order} is in your inbox. You can also download it under Account, then Orders.",
            ]),
        ],
        "wrong": [
            "We do not give invoices.",
            "Write your own receipt.",
            "Invoices cost {amount} each.",
            "Screenshot your bank statement instead.",
        ],
        "offtopic": "Receipts are in your email.",
    },
}

# Optional greeting / sign-off around prompts, so slot-poor templates still vary.
# (prefix, suffix, signed) - signed means the customer gave their name.
PROMPT_PREFIXES = ["", "", "Hi. ", "Hello. ", "Hey, ", "Quick question. ",
                   "Please help. ", "Good morning. ", "Hi, {name} here. "]
PROMPT_SUFFIXES = ["", "", " Thanks.", " Thanks, {name}.", " - {name}",
                   " Please help soon.", " Thank you!", " Regards, {name}."]


def words(text):
    return len(text.split())


def fill(template, slots):
    return template.format(**slots)


def make_prompt(rng, templates, slots):
    """Return (prompt, steps, signed)."""
    template, steps = rng.choice(templates)
    prefix = rng.choice(PROMPT_PREFIXES)
    suffix = rng.choice(PROMPT_SUFFIXES)
    if "{name}" in prefix and "{name}" in suffix:
        suffix = ""
    if "help" in prefix.lower() and "help" in suffix.lower():
        suffix = ""
    signed = "{name}" in prefix or "{name}" in suffix
    prompt = fill(prefix, slots) + fill(template, slots) + fill(suffix, slots)
    return prompt, steps, signed


def make_chosen(rng, steps, slots, signed):
    """Courteous opener + steps matching the question + follow-up offer."""
    openers = OPENERS_NAMED if signed else OPENERS_PLAIN
    body = fill(rng.choice(steps), slots)
    budget = CHOSEN_TARGET_WORDS - words(body)
    pairs = [(o, c) for o in openers for c in CLOSERS
             if words(fill(o, slots)) + words(c) <= budget]
    if not pairs:  # not reached with the current templates
        return body
    opener, closer = rng.choice(pairs)
    return " ".join([fill(opener, slots), body, closer])


def make_rejected(rng, topic_key, slots):
    r = rng.random()
    if r < 0.5:
        # Curt / dismissive: one or two curt phrases.
        text = rng.choice(CURT)
        if rng.random() < 0.4:
            second = rng.choice(CURT)
            if second != text:
                text = text + " " + second
        return text
    if r < 0.75:
        # Wrong or unsafe steps for this very question.
        return fill(rng.choice(TOPICS[topic_key]["wrong"]), slots)
    # Off-topic: terse answer to a different question.
    other = rng.choice([k for k in TOPICS if k != topic_key])
    text = TOPICS[other]["offtopic"]
    if rng.random() < 0.3:
        text = text + " " + rng.choice(CURT)
    return text


def generate(rng):
    rows = []
    seen = set()
    for key, topic in TOPICS.items():
        train_tpls = topic["prompts"][:-1]
        eval_tpls = topic["prompts"][-1:]
        for split, tpls, count in (("train", train_tpls, TRAIN_PER_TOPIC),
                                   ("eval", eval_tpls, EVAL_PER_TOPIC)):
            made = 0
            attempts = 0
            while made < count:
                attempts += 1
                if attempts > 10000:
                    raise RuntimeError("could not make enough unique prompts for %s/%s" % (key, split))
                slots = make_slots(rng)
                prompt, steps, signed = make_prompt(rng, tpls, slots)
                if prompt in seen:
                    continue
                chosen = make_chosen(rng, steps, slots, signed)
                rejected = make_rejected(rng, key, slots)
                if chosen == rejected:
                    continue
                seen.add(prompt)
                # TRL joins prompt + completion as one string: the reply carries its separating space
                rows.append({"prompt": prompt, "chosen": " " + chosen,
                             "rejected": " " + rejected, "split": split})
                made += 1
    rng.shuffle(rows)
    return rows


def check(rows):
    train_prompts = {r["prompt"] for r in rows if r["split"] == "train"}
    pairs = set()
    for r in rows:
        assert words(r["prompt"]) <= MAX_PROMPT_WORDS, r
        assert words(r["chosen"]) <= MAX_REPLY_WORDS, r
        assert words(r["rejected"]) <= MAX_REPLY_WORDS, r
        assert r["chosen"] != r["rejected"], r
        assert r["split"] in ("train", "eval"), r
        for v in r.values():
            v.encode("ascii")
        pair = (r["prompt"], r["chosen"])
        assert pair not in pairs, r
        pairs.add(pair)
        if r["split"] == "eval":
            assert r["prompt"] not in train_prompts, r


def main():
    rng = random.Random(SEED)
    rows = generate(rng)
    check(rows)
    with open(OUT_PATH, "w", encoding="ascii", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=True) + "\n")
    n_eval = sum(r["split"] == "eval" for r in rows)
    print("wrote %d rows (%d train, %d eval) to %s"
          % (len(rows), len(rows) - n_eval, n_eval, OUT_PATH))


if __name__ == "__main__":
    main()
