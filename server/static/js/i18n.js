// Every visible string, in English and Dutch. The language comes from the
// visitor's choice (kept in localStorage), else from the browser, else English.
// Elements carry data-i18n="key" (text), data-i18n-aria="key" (aria-label)
// or data-i18n-alt="key" (alt).

const MESSAGES = {
  en: {
    "common.language": "Language",
    "common.continue": "Continue",
    "common.loading": "Loading…",
    "common.failed": "Something went wrong. Please try again.",
    "common.offline": "No connection to the server. Trying again…",
    "common.camera": "Camera",
    "common.microphone": "Microphone",

    "index.title": "videoconsult",
    "index.heading": "Video consultations",
    "index.text": "This server brokers video consultations between therapists and patients. It keeps only the start, end and duration of each consultation.",
    "index.patients": "Patients: open the link your therapist sent you.",
    "index.login": "Log in as a professional",

    "login.title": "Log in – videoconsult",
    "login.heading": "Log in",
    "login.email": "E-mail address",
    "login.password": "Password",
    "login.code": "Code from your authenticator app",
    "login.submit": "Log in",
    "login.missing": "Fill in your e-mail address and password.",
    "login.codeDigits": "The code has 6 digits.",
    "login.failed": "The e-mail address, password or code is not right.",
    "login.locked": "Too many failed attempts. Wait a while before trying again.",
    "login.reason.idle": "You were logged out because you were inactive for a while.",
    "login.reason.session": "Your session has ended. Please log in again.",
    "login.reason.logout": "You are logged out.",
    "login.reason.login": "",

    "enrol.title": "Set up your account – videoconsult",
    "enrol.heading": "Set up your account",
    "enrol.checking": "Checking your link…",
    "enrol.invalid.title": "This link does not work",
    "enrol.invalid.text": "It may have been used already, or it has expired. Ask your practice's administrator for a new one.",
    "enrol.account": "You are setting up the account",
    "enrol.password": "Choose a password (at least 12 characters)",
    "enrol.passwordAgain": "Type it again",
    "enrol.passwordShort": "The password needs at least 12 characters.",
    "enrol.passwordDiffers": "The two passwords are not the same.",
    "enrol.totp.title": "Connect your authenticator app",
    "enrol.totp.text": "Scan this code with an authenticator app on your phone (for example FreeOTP, Aegis, Google or Microsoft Authenticator). You will need a code from it every time you log in.",
    "enrol.totp.qrAlt": "QR code for your authenticator app",
    "enrol.totp.manual": "Cannot scan? Type this key into the app instead:",
    "enrol.totp.code": "Enter the 6-digit code the app shows now",
    "enrol.totp.once": "This key is shown only now. It is stored encrypted and never shown again.",
    "enrol.finish": "Finish",
    "enrol.done.title": "Your account is ready",
    "enrol.done.text": "From now on you log in with your e-mail address, your password and a fresh code from the app. Wait for the app to show the next code before you log in for the first time.",
    "enrol.done.login": "Go to the login page",
    "role.therapist": "therapist",
    "role.support": "support staff",
    "role.admin": "administrator",

    "app.title": "Consults – videoconsult",
    "app.logout": "Log out",
    "app.notTherapist": "This page is for therapists. Your account has another role.",
    "app.idle.warning": "You will be logged out in {seconds} seconds because you have been inactive.",
    "app.idle.stay": "Stay logged in",
    "app.new.title": "New consult",
    "app.new.name": "Name for the waiting room (optional, not stored)",
    "app.new.minor": "The patient is under 16: a parent or guardian consents too",
    "app.new.create": "Create consult",
    "app.invite.label": "Invite link for the patient (shown only now)",
    "app.invite.copy": "Copy link",
    "app.invite.copied": "Link copied. Send it to your patient.",
    "app.invite.open": "Open the consult",
    "app.list.title": "Your consults",
    "app.list.empty": "No consults yet.",
    "app.list.today": "Today",
    "app.list.earlier": "Earlier",
    "app.list.created": "Created",
    "app.list.name": "Name",
    "app.list.status": "Status",
    "app.list.duration": "Duration",
    "app.list.actions": "Actions",
    "app.list.open": "Open",
    "app.list.newLink": "New link",
    "app.list.revoke": "Revoke link",
    "app.list.revokeConfirm": "Revoke the invite link? It will no longer work, also not to come back into a running consult.",
    "app.list.end": "End",
    "app.list.newLinkConfirm": "This consult is running. A new link stops the current one: if the patient's connection drops, they need the new link to come back. Make a new link?",
    "app.call.admit": "Admit",
    "app.call.deny": "Deny",
    "app.call.waiting": "Your patient is in the waiting room.",
    "app.call.waitingNamed": "{name} is in the waiting room.",
    "app.call.waitingShort": "Patient waiting",
    "app.call.noPatient": "Waiting for the patient…",
    "app.call.share": "Share screen",
    "app.call.stopShare": "Stop sharing",
    "app.call.shareNeedsCamera": "Screen sharing needs a camera connection in this call.",
    "app.call.devices": "Devices",
    "app.call.end": "End consult",
    "app.call.endConfirm": "End the consult for both of you?",
    "app.call.back": "Back to the list",
    "app.over.title": "The consult has ended",
    "app.over.replacedTitle": "Opened elsewhere",
    "app.over.replaced": "You opened this consult in another window or on another device.",
    "app.over.notFound": "This consult was not found. It may belong to another account.",

    "apiError.conflict": "This consult has ended; it needs no new link.",
    "apiError.not_found": "This consult was not found.",
    "apiError.forbidden": "Your account may not do this.",
    "apiError.invalid_field": "Something in the form is not right. Check the name (at most 80 characters).",
    "apiError.too_many_requests": "Too many requests. Wait a moment and try again.",
    "apiError.internal_error": "Something went wrong on the server. Please try again.",
    "status.created": "Not started",
    "status.active": "In progress",
    "status.ended": "Ended",
    "status.not_started": "Never started",

    "join.title": "Your video consultation",
    "join.checking": "Checking your link…",
    "join.problem.title": "This link does not work",
    "join.nowebrtc.title": "This browser cannot make video calls",
    "join.nowebrtc.text": "Please open the link in a recent version of Chrome, Edge, Firefox or Safari. On a phone, use the phone's own browser rather than the browser inside a mail or chat app.",
    "join.intro.title": "Welcome",
    "join.intro.what": "In a moment you will talk with your therapist by video. This is how it goes:",
    "join.intro.step1": "We check that your camera and microphone work.",
    "join.intro.step2": "You agree to join.",
    "join.intro.step3": "You wait in a waiting room until your therapist lets you in.",
    "join.intro.step4": "The call starts. Picture and sound go directly between your device and your therapist's, encrypted.",
    "join.intro.stored.title": "What is stored",
    "join.intro.stored": "Only the start, the end and the duration of the consultation. Not your name, not what is said, and no picture or sound: nothing is recorded.",
    "join.intro.next": "Check camera and microphone",
    "join.devices.title": "Camera and microphone",
    "join.devices.level": "Microphone level: say something",
    "join.devices.preview": "Your camera picture",
    "join.devices.nocamera.short": "No camera",
    "join.devices.retry": "Try again",
    "join.consent.title": "Before you join",
    "join.consent.patient": "I want to join this video consultation. I understand that only its start, end and duration are stored.",
    "join.consent.guardian": "I am the parent or guardian of the patient (who is under 16) and I agree to this video consultation.",
    "join.consent.join": "Join the waiting room",
    "join.waiting.title": "You are in the waiting room",
    "join.waiting.text": "Your therapist will let you in soon. Keep this page open.",
    "join.leave": "Leave",
    "join.denied.title": "Your therapist could not let you in",
    "join.denied.text": "Your therapist cannot see you right now. Please contact them if you are not sure what to do next.",
    "join.denied.retry": "Back to the start",
    "join.call.heading": "In the consultation",
    "join.left.title": "You have left the consultation",
    "join.left.text": "You can join again with the same link while it is valid.",
    "join.left.rejoin": "Join again",
    "join.ended.title": "The consultation has ended",
    "join.ended.text": "Thank you. You can close this page now.",
    "join.replaced.title": "You joined on another device",
    "join.replaced.text": "The consultation continues there. You can close this page.",

    "invite.invite_unknown": "This link is not known. Check that you copied all of it.",
    "invite.invite_expired": "This link has expired. Ask your therapist for a new one.",
    "invite.invite_revoked": "This link is no longer valid. Your therapist may have sent you a new one.",
    "invite.invite_consult_over": "This consultation has ended.",

    "consent.consent_required": "Please tick the box to agree before you join.",
    "consent.guardian_consent_required": "A parent or guardian needs to agree too: please tick the second box.",

    "devices.camera.blocked": "Your camera is blocked for this page. Allow it in the browser's settings (the camera icon in the address bar), then press “Try again”.",
    "devices.camera.missing": "No camera was found.",
    "devices.camera.busy": "Your camera is in use by another program. Close it and press “Try again”.",
    "devices.microphone.blocked": "Your microphone is blocked for this page. Allow it in the browser's settings, then press “Try again”.",
    "devices.microphone.missing": "No microphone was found. Your therapist will not hear you.",
    "devices.microphone.busy": "Your microphone is in use by another program. Close it and press “Try again”.",
    "devices.audioOnly": "You can still join: the consultation goes on with sound only.",

    "call.connecting": "Connecting…",
    "call.mute": "Mute",
    "call.unmute": "Unmute",
    "call.cameraOff": "Camera off",
    "call.cameraOn": "Camera on",
    "call.remoteLabel.patient": "Your therapist",
    "call.remoteLabel.therapist": "Your patient",
    "call.localLabel": "You",
    "call.selfReconnecting": "Connection lost. Reconnecting…",
    "call.peerReconnecting.therapist": "Your therapist's connection dropped. Reconnecting…",
    "call.peerReconnecting.patient": "The patient's connection dropped. Reconnecting…",
    "call.peerLeft.therapist": "Your therapist has left the call. Please wait or close this page.",
    "call.peerLeft.patient": "The patient has left.",

    "ended.ended_by_therapist": "Your therapist ended the consultation. Thank you, you can close this page now.",
    "ended.both_left": "Everyone left the consultation.",
    "ended.max_duration": "The consultation reached its maximum length.",
    "ended.not_joined": "The consultation was closed because nobody joined in time.",
    "ended.consult_over": "This consultation has ended.",

    "quality.unknown": "Connection: –",
    "quality.good": "Connection: good",
    "quality.fair": "Connection: fair",
    "quality.poor": "Connection: poor",
    "quality.rtt": "delay {ms} ms",
    "quality.loss": "loss {percent}%",

    "support.title": "Support – videoconsult",
    "support.heading": "Consults of your organisation",
    "support.privacy": "You see when consults took place, how long they lasted and how they ended, with a pseudonym for the therapist. Names, e-mail addresses, invite links and recordings are never shown here. Every look is recorded in the access log.",
    "support.refused.title": "Support",
    "support.refused.text": "This page is for support staff. Your account has another role.",
    "support.filters.from": "From",
    "support.filters.to": "To",
    "support.filters.status": "Status",
    "support.filters.allStatuses": "All statuses",
    "support.filters.therapist": "Therapist",
    "support.filters.allTherapists": "All therapists",
    "support.filters.apply": "Show",
    "support.filters.reset": "Last 30 days",
    "support.filters.missing": "Choose a start date and an end date.",
    "support.filters.badRange": "The start date must not be after the end date.",
    "support.filters.refused": "These filters were not accepted. Check the dates.",
    "support.list.title": "Consults",
    "support.list.summary": "{total} consults from {from} to {to}",
    "support.list.summaryOne": "1 consult from {from} to {to}",
    "support.list.empty": "No consults match these filters.",
    "support.list.date": "Date",
    "support.list.start": "Start",
    "support.list.end": "End",
    "support.list.duration": "Duration",
    "support.list.status": "Status",
    "support.list.therapist": "Therapist",
    "support.list.consult": "Consult",
    "support.list.actions": "Actions",
    "support.list.log": "Technical log",
    "support.list.logLabel": "Technical log of consult {id}",
    "support.pages.nav": "Pages",
    "support.pages.previous": "Previous",
    "support.pages.next": "Next",
    "support.pages.info": "Page {page} of {pages}",
    "support.pages.perPage": "Per page",
    "support.log.title": "Technical log",
    "support.log.close": "Close",
    "support.log.consult": "Consult {id} · {date} · {status} · therapist {therapist}",
    "support.log.window": "Connection diagnostics of the last 24 hours, newest first: addresses, browsers, connection states and errors. Older entries are deleted and can no longer be read.",
    "support.log.time": "Time",
    "support.log.event": "Event",
    "support.log.details": "Details",
    "support.log.empty": "No entries in the last 24 hours for this consult.",
    "support.log.truncated": "Only the newest {count} entries are shown.",
    "support.log.notFound": "This consult was not found in your organisation.",
    "support.charts.title": "Charts",
    "support.charts.perDay": "Consults per day",
    "support.charts.perDayAlt": "Bar chart of the number of consults on each day from {from} to {to}.",
    "support.charts.durations": "Duration of ended consults, in minutes",
    "support.charts.durationsAlt": "Bar chart of how many consults that ended between {from} and {to} lasted 0–5, 5–10, 10–15, 15–20, 20–30, 30–45, 45–60 and over 60 minutes.",
    "support.charts.tooLong": "Charts cover at most {days} days. Choose a shorter period to see them.",
    "support.charts.failed": "The charts could not be loaded.",
  },
  nl: {
    "common.language": "Taal",
    "common.continue": "Verder",
    "common.loading": "Laden…",
    "common.failed": "Er ging iets mis. Probeer het opnieuw.",
    "common.offline": "Geen verbinding met de server. We proberen het opnieuw…",
    "common.camera": "Camera",
    "common.microphone": "Microfoon",

    "index.title": "videoconsult",
    "index.heading": "Videoconsulten",
    "index.text": "Deze server verbindt therapeuten en patiënten voor videoconsulten. Van elk consult bewaart hij alleen het begin, het einde en de duur.",
    "index.patients": "Patiënten: open de link die uw therapeut u stuurde.",
    "index.login": "Inloggen als zorgverlener",

    "login.title": "Inloggen – videoconsult",
    "login.heading": "Inloggen",
    "login.email": "E-mailadres",
    "login.password": "Wachtwoord",
    "login.code": "Code uit uw authenticator-app",
    "login.submit": "Inloggen",
    "login.missing": "Vul uw e-mailadres en wachtwoord in.",
    "login.codeDigits": "De code heeft 6 cijfers.",
    "login.failed": "Het e-mailadres, het wachtwoord of de code klopt niet.",
    "login.locked": "Te veel mislukte pogingen. Wacht even voor u het opnieuw probeert.",
    "login.reason.idle": "U bent uitgelogd omdat u een tijd niet actief was.",
    "login.reason.session": "Uw sessie is beëindigd. Log opnieuw in.",
    "login.reason.logout": "U bent uitgelogd.",
    "login.reason.login": "",

    "enrol.title": "Uw account instellen – videoconsult",
    "enrol.heading": "Uw account instellen",
    "enrol.checking": "Uw link wordt gecontroleerd…",
    "enrol.invalid.title": "Deze link werkt niet",
    "enrol.invalid.text": "Misschien is hij al gebruikt of verlopen. Vraag de beheerder van uw praktijk om een nieuwe.",
    "enrol.account": "U stelt dit account in:",
    "enrol.password": "Kies een wachtwoord (minstens 12 tekens)",
    "enrol.passwordAgain": "Typ het nog een keer",
    "enrol.passwordShort": "Het wachtwoord moet minstens 12 tekens hebben.",
    "enrol.passwordDiffers": "De twee wachtwoorden zijn niet gelijk.",
    "enrol.totp.title": "Koppel uw authenticator-app",
    "enrol.totp.text": "Scan deze code met een authenticator-app op uw telefoon (bijvoorbeeld FreeOTP, Aegis, Google of Microsoft Authenticator). U hebt er bij elke keer inloggen een code uit nodig.",
    "enrol.totp.qrAlt": "QR-code voor uw authenticator-app",
    "enrol.totp.manual": "Lukt scannen niet? Typ dan deze sleutel in de app:",
    "enrol.totp.code": "Vul de code van 6 cijfers in die de app nu laat zien",
    "enrol.totp.once": "Deze sleutel is alleen nu te zien. Hij wordt versleuteld bewaard en nooit meer getoond.",
    "enrol.finish": "Afronden",
    "enrol.done.title": "Uw account is klaar",
    "enrol.done.text": "Voortaan logt u in met uw e-mailadres, uw wachtwoord en een verse code uit de app. Wacht tot de app de volgende code laat zien voordat u de eerste keer inlogt.",
    "enrol.done.login": "Naar de inlogpagina",
    "role.therapist": "therapeut",
    "role.support": "ondersteuning",
    "role.admin": "beheerder",

    "app.title": "Consulten – videoconsult",
    "app.logout": "Uitloggen",
    "app.notTherapist": "Deze pagina is voor therapeuten. Uw account heeft een andere rol.",
    "app.idle.warning": "U wordt over {seconds} seconden uitgelogd omdat u niet actief bent.",
    "app.idle.stay": "Ingelogd blijven",
    "app.new.title": "Nieuw consult",
    "app.new.name": "Naam voor de wachtkamer (optioneel, wordt niet bewaard)",
    "app.new.minor": "De patiënt is jonger dan 16: een ouder of voogd geeft ook toestemming",
    "app.new.create": "Consult aanmaken",
    "app.invite.label": "Uitnodigingslink voor de patiënt (alleen nu zichtbaar)",
    "app.invite.copy": "Link kopiëren",
    "app.invite.copied": "Link gekopieerd. Stuur hem naar uw patiënt.",
    "app.invite.open": "Consult openen",
    "app.list.title": "Uw consulten",
    "app.list.empty": "Nog geen consulten.",
    "app.list.today": "Vandaag",
    "app.list.earlier": "Eerder",
    "app.list.created": "Aangemaakt",
    "app.list.name": "Naam",
    "app.list.status": "Status",
    "app.list.duration": "Duur",
    "app.list.actions": "Acties",
    "app.list.open": "Openen",
    "app.list.newLink": "Nieuwe link",
    "app.list.revoke": "Link intrekken",
    "app.list.revokeConfirm": "De uitnodigingslink intrekken? Hij werkt dan niet meer, ook niet om terug te komen in een lopend consult.",
    "app.list.end": "Beëindigen",
    "app.list.newLinkConfirm": "Dit consult loopt. Een nieuwe link maakt de huidige ongeldig: als de verbinding van de patiënt wegvalt, heeft die de nieuwe link nodig om terug te komen. Een nieuwe link maken?",
    "app.call.admit": "Toelaten",
    "app.call.deny": "Weigeren",
    "app.call.waiting": "Uw patiënt zit in de wachtkamer.",
    "app.call.waitingNamed": "{name} zit in de wachtkamer.",
    "app.call.waitingShort": "Patiënt wacht",
    "app.call.noPatient": "Wachten op de patiënt…",
    "app.call.share": "Scherm delen",
    "app.call.stopShare": "Stoppen met delen",
    "app.call.shareNeedsCamera": "Scherm delen kan alleen met een cameraverbinding in dit gesprek.",
    "app.call.devices": "Apparaten",
    "app.call.end": "Consult beëindigen",
    "app.call.endConfirm": "Het consult voor u beiden beëindigen?",
    "app.call.back": "Terug naar de lijst",
    "app.over.title": "Het consult is beëindigd",
    "app.over.replacedTitle": "Elders geopend",
    "app.over.replaced": "U hebt dit consult in een ander venster of op een ander apparaat geopend.",
    "app.over.notFound": "Dit consult is niet gevonden. Misschien hoort het bij een ander account.",

    "apiError.conflict": "Dit consult is beëindigd; het heeft geen nieuwe link nodig.",
    "apiError.not_found": "Dit consult is niet gevonden.",
    "apiError.forbidden": "Uw account mag dit niet.",
    "apiError.invalid_field": "Er klopt iets niet in het formulier. Controleer de naam (hoogstens 80 tekens).",
    "apiError.too_many_requests": "Te veel verzoeken. Wacht even en probeer het opnieuw.",
    "apiError.internal_error": "Er ging iets mis op de server. Probeer het opnieuw.",
    "status.created": "Niet begonnen",
    "status.active": "Bezig",
    "status.ended": "Beëindigd",
    "status.not_started": "Nooit begonnen",

    "join.title": "Uw videoconsult",
    "join.checking": "Uw link wordt gecontroleerd…",
    "join.problem.title": "Deze link werkt niet",
    "join.nowebrtc.title": "Met deze browser kunt u niet videobellen",
    "join.nowebrtc.text": "Open de link in een recente versie van Chrome, Edge, Firefox of Safari. Gebruik op een telefoon de eigen browser van de telefoon, niet de browser in een mail- of chat-app.",
    "join.intro.title": "Welkom",
    "join.intro.what": "Zo meteen spreekt u uw therapeut via video. Zo gaat het:",
    "join.intro.step1": "We controleren of uw camera en microfoon werken.",
    "join.intro.step2": "U geeft toestemming om deel te nemen.",
    "join.intro.step3": "U wacht in een wachtkamer tot uw therapeut u binnenlaat.",
    "join.intro.step4": "Het gesprek begint. Beeld en geluid gaan rechtstreeks en versleuteld tussen uw apparaat en dat van uw therapeut.",
    "join.intro.stored.title": "Wat wordt bewaard",
    "join.intro.stored": "Alleen het begin, het einde en de duur van het consult. Niet uw naam, niet wat er gezegd wordt, en geen beeld of geluid: er wordt niets opgenomen.",
    "join.intro.next": "Camera en microfoon controleren",
    "join.devices.title": "Camera en microfoon",
    "join.devices.level": "Microfoonniveau: zeg iets",
    "join.devices.preview": "Uw camerabeeld",
    "join.devices.nocamera.short": "Geen camera",
    "join.devices.retry": "Opnieuw proberen",
    "join.consent.title": "Voordat u deelneemt",
    "join.consent.patient": "Ik wil deelnemen aan dit videoconsult. Ik begrijp dat alleen het begin, het einde en de duur worden bewaard.",
    "join.consent.guardian": "Ik ben de ouder of voogd van de patiënt (jonger dan 16) en ik geef toestemming voor dit videoconsult.",
    "join.consent.join": "Naar de wachtkamer",
    "join.waiting.title": "U bent in de wachtkamer",
    "join.waiting.text": "Uw therapeut laat u zo binnen. Houd deze pagina open.",
    "join.leave": "Verlaten",
    "join.denied.title": "Uw therapeut kon u niet binnenlaten",
    "join.denied.text": "Uw therapeut kan u nu niet spreken. Neem contact op als u niet zeker weet wat u nu moet doen.",
    "join.denied.retry": "Terug naar het begin",
    "join.call.heading": "In het consult",
    "join.left.title": "U hebt het consult verlaten",
    "join.left.text": "U kunt met dezelfde link opnieuw deelnemen zolang die geldig is.",
    "join.left.rejoin": "Opnieuw deelnemen",
    "join.ended.title": "Het consult is beëindigd",
    "join.ended.text": "Dank u wel. U kunt deze pagina nu sluiten.",
    "join.replaced.title": "U neemt deel op een ander apparaat",
    "join.replaced.text": "Het consult gaat daar verder. U kunt deze pagina sluiten.",

    "invite.invite_unknown": "Deze link is onbekend. Controleer of u de hele link hebt gekopieerd.",
    "invite.invite_expired": "Deze link is verlopen. Vraag uw therapeut om een nieuwe.",
    "invite.invite_revoked": "Deze link is niet meer geldig. Misschien heeft uw therapeut u een nieuwe gestuurd.",
    "invite.invite_consult_over": "Dit consult is beëindigd.",

    "consent.consent_required": "Vink het vakje aan om toestemming te geven voordat u deelneemt.",
    "consent.guardian_consent_required": "Een ouder of voogd moet ook toestemming geven: vink het tweede vakje aan.",

    "devices.camera.blocked": "Uw camera is geblokkeerd voor deze pagina. Sta hem toe in de instellingen van de browser (het camerapictogram in de adresbalk) en kies dan “Opnieuw proberen”.",
    "devices.camera.missing": "Er is geen camera gevonden.",
    "devices.camera.busy": "Uw camera wordt door een ander programma gebruikt. Sluit dat en kies “Opnieuw proberen”.",
    "devices.microphone.blocked": "Uw microfoon is geblokkeerd voor deze pagina. Sta hem toe in de instellingen van de browser en kies dan “Opnieuw proberen”.",
    "devices.microphone.missing": "Er is geen microfoon gevonden. Uw therapeut kan u dan niet horen.",
    "devices.microphone.busy": "Uw microfoon wordt door een ander programma gebruikt. Sluit dat en kies “Opnieuw proberen”.",
    "devices.audioOnly": "U kunt toch deelnemen: het consult gaat verder met alleen geluid.",

    "call.connecting": "Verbinden…",
    "call.mute": "Dempen",
    "call.unmute": "Dempen opheffen",
    "call.cameraOff": "Camera uit",
    "call.cameraOn": "Camera aan",
    "call.remoteLabel.patient": "Uw therapeut",
    "call.remoteLabel.therapist": "Uw patiënt",
    "call.localLabel": "U",
    "call.selfReconnecting": "Verbinding verbroken. Opnieuw verbinden…",
    "call.peerReconnecting.therapist": "De verbinding van uw therapeut is weggevallen. Opnieuw verbinden…",
    "call.peerReconnecting.patient": "De verbinding van de patiënt is weggevallen. Opnieuw verbinden…",
    "call.peerLeft.therapist": "Uw therapeut heeft het gesprek verlaten. Wacht even of sluit deze pagina.",
    "call.peerLeft.patient": "De patiënt is vertrokken.",

    "ended.ended_by_therapist": "Uw therapeut heeft het consult beëindigd. Dank u wel, u kunt deze pagina nu sluiten.",
    "ended.both_left": "Iedereen heeft het consult verlaten.",
    "ended.max_duration": "Het consult heeft de maximale duur bereikt.",
    "ended.not_joined": "Het consult is gesloten omdat niemand op tijd deelnam.",
    "ended.consult_over": "Dit consult is beëindigd.",

    "quality.unknown": "Verbinding: –",
    "quality.good": "Verbinding: goed",
    "quality.fair": "Verbinding: redelijk",
    "quality.poor": "Verbinding: slecht",
    "quality.rtt": "vertraging {ms} ms",
    "quality.loss": "verlies {percent}%",

    "support.title": "Ondersteuning – videoconsult",
    "support.heading": "Consulten van uw organisatie",
    "support.privacy": "U ziet wanneer consulten plaatsvonden, hoe lang ze duurden en hoe ze eindigden, met een pseudoniem voor de therapeut. Namen, e-mailadressen, uitnodigingslinks en opnamen worden hier nooit getoond. Elke inzage wordt vastgelegd in het toegangslogboek.",
    "support.refused.title": "Ondersteuning",
    "support.refused.text": "Deze pagina is voor medewerkers van de ondersteuning. Uw account heeft een andere rol.",
    "support.filters.from": "Van",
    "support.filters.to": "Tot en met",
    "support.filters.status": "Status",
    "support.filters.allStatuses": "Alle statussen",
    "support.filters.therapist": "Therapeut",
    "support.filters.allTherapists": "Alle therapeuten",
    "support.filters.apply": "Tonen",
    "support.filters.reset": "Laatste 30 dagen",
    "support.filters.missing": "Kies een begindatum en een einddatum.",
    "support.filters.badRange": "De begindatum mag niet na de einddatum liggen.",
    "support.filters.refused": "Deze filters zijn niet geaccepteerd. Controleer de datums.",
    "support.list.title": "Consulten",
    "support.list.summary": "{total} consulten van {from} tot en met {to}",
    "support.list.summaryOne": "1 consult van {from} tot en met {to}",
    "support.list.empty": "Geen consulten die aan deze filters voldoen.",
    "support.list.date": "Datum",
    "support.list.start": "Begin",
    "support.list.end": "Einde",
    "support.list.duration": "Duur",
    "support.list.status": "Status",
    "support.list.therapist": "Therapeut",
    "support.list.consult": "Consult",
    "support.list.actions": "Acties",
    "support.list.log": "Technisch logboek",
    "support.list.logLabel": "Technisch logboek van consult {id}",
    "support.pages.nav": "Pagina's",
    "support.pages.previous": "Vorige",
    "support.pages.next": "Volgende",
    "support.pages.info": "Pagina {page} van {pages}",
    "support.pages.perPage": "Per pagina",
    "support.log.title": "Technisch logboek",
    "support.log.close": "Sluiten",
    "support.log.consult": "Consult {id} · {date} · {status} · therapeut {therapist}",
    "support.log.window": "Verbindingsgegevens van de afgelopen 24 uur, nieuwste eerst: adressen, browsers, verbindingsstatussen en fouten. Oudere meldingen worden verwijderd en zijn niet meer te lezen.",
    "support.log.time": "Tijd",
    "support.log.event": "Gebeurtenis",
    "support.log.details": "Details",
    "support.log.empty": "Geen meldingen in de afgelopen 24 uur voor dit consult.",
    "support.log.truncated": "Alleen de nieuwste {count} meldingen worden getoond.",
    "support.log.notFound": "Dit consult is niet gevonden in uw organisatie.",
    "support.charts.title": "Grafieken",
    "support.charts.perDay": "Consulten per dag",
    "support.charts.perDayAlt": "Staafdiagram van het aantal consulten per dag van {from} tot en met {to}.",
    "support.charts.durations": "Duur van beëindigde consulten, in minuten",
    "support.charts.durationsAlt": "Staafdiagram van hoeveel consulten die eindigden tussen {from} en {to} 0–5, 5–10, 10–15, 15–20, 20–30, 30–45, 45–60 en meer dan 60 minuten duurden.",
    "support.charts.tooLong": "Grafieken beslaan hoogstens {days} dagen. Kies een kortere periode om ze te zien.",
    "support.charts.failed": "De grafieken konden niet worden geladen.",
  },
};

export const LANGUAGES = { en: "English", nl: "Nederlands" };
const STORAGE_KEY = "videoconsult.language";

function pick() {
  const saved = localStorage.getItem(STORAGE_KEY);
  if (saved && MESSAGES[saved]) return saved;
  for (const tag of navigator.languages || [navigator.language || "en"]) {
    const base = tag.toLowerCase().split("-")[0];
    if (MESSAGES[base]) return base;
  }
  return "en";
}

let current = pick();

export function language() {
  return current;
}

// The text of ``key`` in the current language, with {name} filled in.
export function t(key, vars = {}, fallback = undefined) {
  let text = MESSAGES[current][key];
  if (text === undefined) text = MESSAGES.en[key];
  if (text === undefined) {
    if (fallback !== undefined) return fallback;
    console.warn("untranslated", key);
    return key;
  }
  return text.replace(/\{(\w+)\}/g, (match, name) => (name in vars ? String(vars[name]) : match));
}

export function translatePage(root = document) {
  document.documentElement.lang = current;
  for (const element of root.querySelectorAll("[data-i18n]")) {
    element.textContent = t(element.dataset.i18n);
  }
  for (const element of root.querySelectorAll("[data-i18n-aria]")) {
    element.setAttribute("aria-label", t(element.dataset.i18nAria));
  }
  for (const element of root.querySelectorAll("[data-i18n-alt]")) {
    element.setAttribute("alt", t(element.dataset.i18nAlt));
  }
  const title = document.querySelector("title[data-i18n]");
  if (title) document.title = t(title.dataset.i18n);
}

// The language <select>: filled, set, and switching the page when changed.
export function setupLanguage(select, onChange) {
  select.replaceChildren();
  for (const [code, name] of Object.entries(LANGUAGES)) {
    const option = document.createElement("option");
    option.value = code;
    option.textContent = name;
    option.lang = code;
    option.selected = code === current;
    select.append(option);
  }
  select.addEventListener("change", () => {
    current = MESSAGES[select.value] ? select.value : "en";
    localStorage.setItem(STORAGE_KEY, current);
    onChange();
  });
}

export function formatTime(iso, withDate = false) {
  const options = withDate
    ? { day: "numeric", month: "short", hour: "2-digit", minute: "2-digit" }
    : { hour: "2-digit", minute: "2-digit" };
  return new Intl.DateTimeFormat(current, options).format(new Date(iso));
}

export function formatDuration(seconds) {
  const minutes = Math.floor(seconds / 60);
  const rest = seconds % 60;
  return `${minutes}:${String(rest).padStart(2, "0")}`;
}

// For tests: every key of every language.
export const _messages = MESSAGES;
