// Small pieces both pages use: the mute and camera buttons, the quality badge.
import { locale, say, t } from "./i18n.js";

function setToggle(button, pressed, onKey, offKey) {
  button.setAttribute("aria-pressed", String(pressed));
  say(button, pressed ? offKey : onKey);
}

// A new stream sends camera and microphone: the buttons back to "on".
export function resetCallControls(muteButton, cameraButton) {
  setToggle(muteButton, false, "call.mute", "call.unmute");
  setToggle(cameraButton, false, "call.cameraOff", "call.cameraOn");
}

// onChange: after each toggle (the page tells the other side).
export function bindCallControls({ getStream, muteButton, cameraButton, onChange = () => {} }) {
  muteButton.addEventListener("click", () => {
    const stream = getStream();
    const tracks = stream ? stream.getAudioTracks() : [];
    const muted = muteButton.getAttribute("aria-pressed") !== "true";
    for (const track of tracks) track.enabled = !muted;
    setToggle(muteButton, muted, "call.mute", "call.unmute");
    onChange();
  });
  cameraButton.addEventListener("click", () => {
    const stream = getStream();
    const tracks = stream ? stream.getVideoTracks() : [];
    const off = cameraButton.getAttribute("aria-pressed") !== "true";
    for (const track of tracks) track.enabled = !off;
    setToggle(cameraButton, off, "call.cameraOff", "call.cameraOn");
    onChange();
  });
}

// What the other participant's camera and microphone do ("media-state"),
// in words over the stage; hidden while both are on (or nothing is known).
// who: "patient" or "therapist", the other participant's role.
export function showPeerMedia(element, state, who) {
  const sentences = [];
  for (const kind of ["camera", "microphone"]) {
    const value = state && state[kind];
    if (!value || value === "on") continue;
    const text = t(`peer.${kind}.${value}`, { who: t(`peer.who.${who}`) }, "");
    if (text) sentences.push(text.charAt(0).toUpperCase() + text.slice(1));
  }
  element.textContent = sentences.join(" ");
  element.hidden = sentences.length === 0;
  element.classList.toggle("peer-dark", Boolean(state && state.camera && state.camera !== "on"));
}

export function showQuality(element, stats) {
  // The badge is a live region: change its text only when the level changes.
  if (element.dataset.level !== stats.level) {
    element.dataset.level = stats.level;
    say(element, `quality.${stats.level}`);
  }
  const details = [];
  if (stats.rttMs !== null) details.push(t("quality.rtt", { ms: Math.round(stats.rttMs) }));
  details.push(t("quality.loss", { percent: (stats.loss * 100).toFixed(1) }));
  element.title = details.join(", ");
}

// Show one <section> of <main> and hide the others.
export function showSection(id) {
  for (const section of document.querySelectorAll("main > section")) {
    section.hidden = section.id !== id;
  }
}

// Once the page is on its way to the login page, the first reason stands: a
// request that finds the session gone meanwhile (the logout just ended it)
// does not send the page there again with another reason.
let leaving = false;

export function loggingOut() {
  leaving = true;
}

// Back to the login page, saying why; an idle professional is logged out on
// the server first. The page to come back to goes along as "next".
export async function toLogin(reason) {
  if (leaving) return;
  leaving = true;
  if (reason === "idle") {
    await fetch("/api/logout", { method: "POST", credentials: "same-origin" }).catch(() => {});
  }
  const next = location.pathname + location.search;
  location.assign(`/login?reason=${reason}&next=${encodeURIComponent(next)}`);
}

// What is wrong with the camera and the microphone, in words (media.js names
// the problems); with audioOnlyNote, that the consult can go on with sound.
export function showDeviceProblems(element, media, { audioOnlyNote = false } = {}) {
  const problems = [];
  if (media.camera) problems.push(t(`devices.camera.${media.camera}`));
  if (media.microphone) problems.push(t(`devices.microphone.${media.microphone}`));
  if (audioOnlyNote && media.camera && !media.microphone) problems.push(t("devices.audioOnly"));
  say(element, ""); // several sentences: the page shows them again itself
  element.textContent = problems.join(" ");
  element.hidden = problems.length === 0;
  return problems.length > 0;
}

// What the account holder must be told (a reset of their credentials), each
// with a button that dismisses it on the server (and takes it out of
// ``notices``, so that showing them again, in another language, leaves it out).
export function showAccountNotices(container, notices) {
  container.replaceChildren();
  for (const notice of notices || []) {
    const box = document.createElement("div");
    box.className = "notice account-notice";
    box.setAttribute("role", "alert");
    const text = document.createElement("p");
    const by = notice.by_email || t(`notice.by.${notice.by_role}`, {}, notice.by_role);
    const at = new Date(notice.at).toLocaleString(locale());
    text.textContent = t(`notice.${notice.kind}`, { at, by }, notice.kind);
    const button = document.createElement("button");
    button.type = "button";
    button.className = "small";
    button.textContent = t("notice.dismiss");
    button.addEventListener("click", async () => {
      const response = await fetch(`/api/session/notices/${notice.id}/dismiss`, {
        method: "POST",
        credentials: "same-origin",
      }).catch(() => null);
      if (response && (response.ok || response.status === 404)) {
        box.remove();
        notices.splice(notices.indexOf(notice), 1);
      }
    });
    box.append(text, button);
    container.append(box);
  }
}
