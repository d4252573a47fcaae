// The patient's page at /join/<token>: link check, explanation, device
// check, consent, waiting room, call, and the end. No inline script (CSP).
import { ConsultCall, LinkProblem } from "./call.js";
import { locale, say, setupLanguage, t, translatePage } from "./i18n.js";
import { getMedia, showDevices, showLevel, stopStream, webrtcSupported } from "./media.js";
import { ReceiptOffer } from "./receipt_offer.js";
import { RecordingView } from "./recording.js";
import { bindCallControls, resetCallControls, showDeviceProblems, showPeerMedia, showQuality } from "./ui.js";

const token = decodeURIComponent(location.pathname.split("/").pop() || "");
const inviteApi = `/api/invites/${encodeURIComponent(token)}`;
// Survives a reload of this tab (not a new tab): back into the same consult.
// Keyed by a hash of the token, so the token itself is not stored.
let joinedKey = "videoconsult.joined";
const $ = (id) => document.getElementById(id);

let invite = null;
// What the tab keeps under its key after a consult ended (a reload says so).
const ENDED = "ended";
// How long a ticket request may take before it is tried again.
const TICKET_TIMEOUT_MS = 15_000;
// The consult ended, or the patient left: a camera still starting is stopped.
let mediaReleased = false;
let media = { stream: null, camera: null, microphone: null };
// The camera and microphone being started: one start at a time, each after
// the one before (which it stops), and the consult joined only once the last
// has started (a phone's camera takes a moment).
let mediaStarted = Promise.resolve();
let stopMeter = () => {};
let call = null;
let lastLinkProblem = null;
let recording = null;
// This tab joined the consult with the link (now, or before a reload).
let joinedHere = false;
let peerMedia = null;
let receipt = null;

function peerMediaShown(state) {
  peerMedia = state;
  showPeerMedia($("peer-media"), state, "therapist");
}

function show(id) {
  // A question about the call goes with it (the consult ended meanwhile).
  if ($("leave-confirm").open) $("leave-confirm").close();
  for (const section of document.querySelectorAll("main > section")) {
    section.hidden = section.id !== id;
  }
  const heading = $(id).querySelector("h1");
  if (heading) {
    heading.tabIndex = -1;
    heading.focus({ preventScroll: true });
  }
}

function linkProblem(code) {
  if (code === "waiting_room_not_open") {
    // The page was opened before the waiting room: check again, which says when.
    checkLink();
    return;
  }
  // The server deletes an invite when its consult ends, and then knows the
  // link no more; a link that worked in this tab belongs to a consult that
  // is over.
  if (code === "invite_unknown" && (joinedHere || sessionStorage.getItem(joinedKey))) {
    code = "invite_consult_over";
    joinedHere = true;
    // Kept, as an end: the page says the same after another reload.
    sessionStorage.setItem(joinedKey, ENDED);
  }
  if (code === "invite_consult_over") receipt.show($("link-problem"));
  lastLinkProblem = code;
  $("link-problem-text").textContent = t(`invite.${code}`, {}, t("invite.invite_unknown"));
  show("link-problem");
}

async function checkLink() {
  let response;
  try {
    response = await fetch(inviteApi, { credentials: "same-origin" });
  } catch {
    say($("checking").querySelector("p"), "common.offline");
    setTimeout(checkLink, 3000);
    return;
  }
  const data = await response.json().catch(() => ({}));
  if (response.status === 404 || response.status === 410) {
    linkProblem((data.error && data.error.code) || "invite_unknown");
    return;
  }
  if (!response.ok) {
    // The server is busy or restarting: not the link's fault. Try again.
    say($("checking").querySelector("p"), "common.offline");
    setTimeout(checkLink, 3000);
    return;
  }
  invite = data;
  if (invite.opens_at) {
    tooEarly(invite.opens_at);
    return;
  }
  $("guardian-row").hidden = !invite.guardian_consent;
  $("guardian-box").required = Boolean(invite.guardian_consent);
  const saved = sessionStorage.getItem(joinedKey);
  if (saved && saved !== ENDED) {
    // A reload in the middle of the consult: straight back in.
    acquireMedia();
    join(JSON.parse(saved));
    return;
  }
  show("intro");
}

// When the waiting room opens, in the page's language (again after a change).
let opensShown = null;

function showOpening() {
  // The browser's own locale where it speaks the page's language (en-GB: a
  // 24-hour clock), as every other time on the pages.
  const lang = locale();
  $("too-early-text").textContent = t("join.early.text", {
    date: opensShown.toLocaleDateString(lang, { weekday: "long", day: "numeric", month: "long" }),
    time: opensShown.toLocaleTimeString(lang, { hour: "2-digit", minute: "2-digit" }),
  });
}

// The appointment is later: say when to come back, and look again then
// (a page left open moves on by itself).
function tooEarly(opensAt) {
  const opens = new Date(opensAt);
  opensShown = opens;
  showOpening();
  show("too-early");
  // At most every 10 minutes (a sleeping laptop's timers run late), at the
  // earliest a second after the opening.
  const wait = Math.min(Math.max(opens.getTime() - Date.now() + 1000, 1000), 10 * 60 * 1000);
  setTimeout(checkLink, wait);
}

// --- devices ---------------------------------------------------------------

function acquireMedia(choice = {}) {
  // A start that failed (it says why on the page) holds back no later one.
  mediaStarted = mediaStarted.catch(() => {}).then(() => startMedia(choice));
  return mediaStarted;
}

async function startMedia(choice) {
  stopMeter();
  stopStream(media.stream);
  media = { stream: null, camera: null, microphone: null };
  const started = await getMedia(choice);
  if (mediaReleased) {
    // The consult ended while the camera started: nothing stays open.
    stopStream(started.stream);
    return;
  }
  media = started;
  // A new stream sends everything: the buttons say so again.
  resetCallControls($("mute"), $("camera"));
  $("preview").srcObject = media.stream;
  $("preview-off").hidden = Boolean(media.stream && media.stream.getVideoTracks().length);
  stopMeter = showLevel(media.stream, $("mic-level"));
  showProblems();
  await showDevices(media.stream, $("camera-select"), $("mic-select"), {
    camera: t("common.camera"),
    microphone: t("common.microphone"),
  });
}

function showProblems() {
  showDeviceProblems($("device-problem"), media, { audioOnlyNote: true });
}

async function deviceCheck() {
  show("device-check");
  await acquireMedia();
}

// --- joining -----------------------------------------------------------------

async function ticketUrl(consent) {
  // A request that hangs (a phone's bad signal) is given up and tried again,
  // the waiting room saying so, rather than waited for without end.
  const response = await fetch(`${inviteApi}/ticket`, {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(consent),
    signal: AbortSignal.timeout(TICKET_TIMEOUT_MS),
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const code = (data.error && data.error.code) || "invite_unknown";
    if ([404, 409, 410, 422].includes(response.status)) {
      throw new LinkProblem(code, (data.error && data.error.message) || "");
    }
    throw new Error(`ticket: ${response.status}`);
  }
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/ws?ticket=${encodeURIComponent(data.ticket)}`;
}

async function join(consent) {
  joinedHere = true;
  mediaReleased = false;
  sessionStorage.setItem(joinedKey, JSON.stringify(consent));
  show("waiting");
  // With the camera and microphone the patient saw in the check, once started.
  await mediaStarted.catch(() => {});
  if (!media.stream && !media.camera && !media.microphone) {
    // Nothing started since an end let the last go (the server asked for
    // consent again): start them again rather than join without them.
    await acquireMedia().catch(() => {});
  }
  if (mediaReleased) return; // ended or left meanwhile
  stopMeter();
  $("local-video").srcObject = media.stream;
  call = new ConsultCall({
    role: "patient",
    socketUrl: () => ticketUrl(consent),
    onEvent: onCallEvent,
  });
  call.setLocalStream(media.stream, { camera: media.camera, microphone: media.microphone });
  window.videoconsult = { call };
  call.connect();
}

let bannerKey = null;
let endedKey = null;

function banner(key) {
  bannerKey = key || null;
  $("banner").textContent = key ? t(key) : "";
  $("banner").hidden = !key;
}

// In the waiting room: whether the therapist has the consult open now.
let presenceKey = null;

function therapistPresent(present) {
  presenceKey = present ? "join.waiting.therapistHere" : "join.waiting.therapistAway";
  $("waiting-therapist").textContent = t(presenceKey);
}

function onCallEvent(type, detail) {
  switch (type) {
    case "welcome":
      banner("");
      recording.welcome(detail.recording);
      say($("waiting-status"), "");
      therapistPresent(detail.peer_present);
      if (detail.state === "active") {
        show("call");
        // Back in the running consult (a reload): the key this tab was given.
        receipt.ask(inviteApi, receipt.keptKey(inviteApi));
      } else {
        show("waiting");
      }
      break;
    case "peer-presence":
      therapistPresent(detail.present);
      break;
    case "admitted":
      show("call");
      receipt.keepKey(inviteApi, detail.receipt_key);
      receipt.ask(inviteApi, detail.receipt_key);
      break;
    case "reconnecting":
      if (!$("call").hidden) banner("call.selfReconnecting");
      else say($("waiting-status"), "call.selfReconnecting");
      break;
    case "peer-reconnecting":
      banner("call.peerReconnecting.therapist");
      break;
    case "peer-rejoined":
      banner("");
      break;
    case "peer-left":
      banner("call.peerLeft.therapist");
      peerMediaShown(null);
      break;
    case "remote-stream":
      $("remote-video").srcObject = detail.stream;
      break;
    case "connection":
      $("remote-waiting").hidden = detail.state === "connected";
      if (detail.state === "connected") banner("");
      break;
    case "quality":
      showQuality($("quality"), detail);
      break;
    case "peer-media":
      peerMediaShown(detail);
      break;
    case "recording":
      recording.update(detail);
      break;
    case "recorder":
      recording.recorderProblem(detail.state);
      break;
    case "protocol-error":
      recording.error(detail);
      break;
    case "ended":
      finish("ended");
      receipt.show($("ended"));
      endedKey = `ended.${detail.reason}`;
      $("ended-text").textContent = t(endedKey, {}, t("join.ended.text"));
      break;
    case "denied":
      finish("denied");
      break;
    case "replaced":
      finish("replaced");
      break;
    case "left":
      finish("left");
      break;
    case "link-problem":
      finish(null);
      if (detail.code === "consent_required" || detail.code === "guardian_consent_required") {
        show("consent");
        say($("consent-error"), `consent.${detail.code}`);
      } else {
        linkProblem(detail.code);
      }
      break;
    default:
      break;
  }
}

function finish(section) {
  // After an end the tab remembers it joined (a reload says the consult has
  // ended); after leaving, a denial or a replacement it starts afresh.
  if (section === "ended") sessionStorage.setItem(joinedKey, ENDED);
  else sessionStorage.removeItem(joinedKey);
  recording.reset();
  mediaReleased = true;
  stopMeter();
  stopStream(media.stream);
  media = { stream: null, camera: null, microphone: null };
  for (const video of document.querySelectorAll("video")) video.srcObject = null;
  banner("");
  peerMediaShown(null);
  if (section) show(section);
}

// --- wiring ------------------------------------------------------------------

function wire() {
  receipt = new ReceiptOffer($("receipt-offer"), $("receipt-link"));
  recording = new RecordingView({
    role: "patient",
    getCall: () => call,
    guardianDefault: () => Boolean(invite && invite.guardian_consent),
  });
  $("intro-next").addEventListener("click", () => {
    mediaReleased = false;
    deviceCheck();
  });
  $("devices-retry").addEventListener("click", () =>
    acquireMedia({ cameraId: $("camera-select").value || null, microphoneId: $("mic-select").value || null }),
  );
  for (const id of ["camera-select", "mic-select"]) {
    $(id).addEventListener("change", () =>
      acquireMedia({ cameraId: $("camera-select").value || null, microphoneId: $("mic-select").value || null }),
    );
  }
  $("devices-next").addEventListener("click", () => show("consent"));
  $("consent-form").addEventListener("submit", (event) => {
    event.preventDefault();
    if (!$("consent-box").checked) {
      say($("consent-error"), "consent.consent_required");
      return;
    }
    if (invite.guardian_consent && !$("guardian-box").checked) {
      say($("consent-error"), "consent.guardian_consent_required");
      return;
    }
    say($("consent-error"), "");
    join({ consent: true, guardian_consent: Boolean(invite.guardian_consent) });
  });
  const leave = () => call && call.leave();
  $("waiting-leave").addEventListener("click", leave);
  // In the call, a tap on Leave asks first (a thumb on a phone finds it by
  // mistake); Stay, Escape or the call ending meanwhile keeps the patient in.
  const confirmLeave = $("leave-confirm");
  $("leave").addEventListener("click", () => {
    confirmLeave.showModal();
    $("leave-confirm-stay").focus();
  });
  $("leave-confirm-stay").addEventListener("click", () => confirmLeave.close());
  $("leave-confirm-leave").addEventListener("click", () => {
    confirmLeave.close();
    leave();
  });
  for (const id of ["rejoin", "denied-retry"]) {
    $(id).addEventListener("click", () => {
      // A new way in: the patient agrees anew (a box still ticked from the
      // last time would be unticked by the tap the page asks for).
      $("consent-box").checked = false;
      $("guardian-box").checked = false;
      say($("consent-error"), "");
      show("checking");
      checkLink();
    });
  }
  bindCallControls({
    getStream: () => media.stream,
    muteButton: $("mute"),
    cameraButton: $("camera"),
    onChange: () => call && call.sendMediaState(),
  });
  window.addEventListener("pagehide", () => stopMeter());
}

setupLanguage($("language"), () => {
  translatePage();
  if (lastLinkProblem) linkProblem(lastLinkProblem);
  banner(bannerKey);
  if (presenceKey) $("waiting-therapist").textContent = t(presenceKey);
  if (endedKey) $("ended-text").textContent = t(endedKey, {}, t("join.ended.text"));
  if (opensShown) showOpening();
  showProblems();
  peerMediaShown(peerMedia);
});
translatePage();
wire();
if (!webrtcSupported()) {
  show("no-webrtc");
} else {
  tokenKey().then((key) => {
    joinedKey = key;
    checkLink();
  });
}

async function tokenKey() {
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(token));
  const hex = Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
  return `videoconsult.joined.${hex.slice(0, 32)}`;
}
