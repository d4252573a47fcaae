// The therapist's app at /app: consults list, new consult with its invite
// link, the call view, logout and the idle timeout.
import {
  appointmentFields,
  askForEmail,
  clearAppointmentFields,
  consultTime,
  groupByTime,
  labelOf,
  showMailOutcome,
} from "./appointments.js";
import { ConsultCall, LinkProblem } from "./call.js";
import { formatDuration, formatTime, setupLanguage, t, translatePage } from "./i18n.js";
import { chime, getMedia, showDevices, stopStream, webrtcSupported } from "./media.js";
import { RecordingView } from "./recording.js";
import { RecordingsList } from "./recordings.js";
import { showWayHome } from "./roles.js";
import {
  bindCallControls,
  showAccountNotices,
  showDeviceProblems,
  showPeerMedia,
  showQuality,
  showSection,
  toLogin,
} from "./ui.js";

const $ = (id) => document.getElementById(id);
const IDLE_WARNING_S = 90;
// The server's idle clock restarts with every request; touching it this often
// keeps it at most this far behind the page's own.
const TOUCH_EVERY_MS = 30_000;
// Shared by the therapist's tabs: activity in one keeps the others awake.
const ACTIVITY_KEY = "videoconsult.activity";

let account = null;
let idleTimeoutS = 900;
let lastActivity = Date.now();
let lastTouch = Date.now();
let call = null;
let consultId = null;
let media = { stream: null, camera: null, microphone: null };
let cameraTrack = null;
let screenTrack = null;
let createdConsultId = null;
let titleFlash = null;
let lastConsults = [];
let callOver = null;
let recording = null;
let peerMedia = null;

function peerMediaShown(state) {
  peerMedia = state;
  showPeerMedia($("peer-media"), state, "patient");
}

// --- talking to the API ------------------------------------------------------

async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    credentials: "same-origin",
    headers: body === undefined ? {} : { "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  lastTouch = Date.now();
  if (response.status === 401) {
    toLogin("session");
    throw new Error("not logged in");
  }
  const data = response.status === 204 ? {} : await response.json().catch(() => ({}));
  if (!response.ok) {
    const code = data.error && data.error.code;
    // In the page's language where we know the code; the server's words otherwise.
    const error = new Error(t(`apiError.${code}`, {}, (data.error && data.error.message) || t("common.failed")));
    error.code = code;
    throw error;
  }
  return data;
}

const show = showSection;

// --- the idle timeout ---------------------------------------------------------

function activity() {
  lastActivity = Date.now();
  localStorage.setItem(ACTIVITY_KEY, String(lastActivity));
  $("idle-warning").hidden = true;
  if (Date.now() - lastTouch > TOUCH_EVERY_MS) {
    // Keep the server's idle timer in step with a therapist who is at work.
    api("POST", "/api/session/touch").catch(() => {});
  }
}

function checkIdle() {
  // An open consult socket keeps the session alive on the server, and counts
  // as activity for every tab.
  if (call && !call.finished) {
    activity();
    return;
  }
  const shared = Number(localStorage.getItem(ACTIVITY_KEY)) || 0;
  if (shared > lastActivity) {
    lastActivity = shared;
    $("idle-warning").hidden = true;
  }
  const idleS = (Date.now() - lastActivity) / 1000;
  if (idleS >= idleTimeoutS) {
    lastActivity = Date.now();
    toLogin("idle");
  } else if (idleS >= idleTimeoutS - IDLE_WARNING_S) {
    const left = Math.max(0, Math.round(idleTimeoutS - idleS));
    $("idle-text").textContent = t("app.idle.warning", { seconds: left });
    $("idle-warning").hidden = false;
  }
}

// --- the list -----------------------------------------------------------------

function statusLabel(status) {
  return t(`status.${status}`);
}

function renderList(consults) {
  lastConsults = consults;
  const groups = $("list-groups");
  groups.replaceChildren();
  $("list-empty").hidden = consults.length > 0;
  const today = new Date().toDateString();
  for (const [titleKey, items] of groupByTime(consults)) {
    if (!items.length) continue;
    const heading = document.createElement("h3");
    heading.textContent = t(titleKey);
    const table = document.createElement("table");
    table.className = "consults";
    const head = table.createTHead().insertRow();
    for (const key of ["app.list.time", "app.list.name", "app.list.status", "app.list.duration", "app.list.actions"]) {
      const cell = document.createElement("th");
      cell.scope = "col";
      cell.textContent = t(key);
      head.append(cell);
    }
    const body = table.createTBody();
    for (const consult of items) {
      const row = body.insertRow();
      row.dataset.consult = consult.id;
      const when = consultTime(consult);
      row.insertCell().textContent = formatTime(when.toISOString(), when.toDateString() !== today);
      row.insertCell().textContent = consult.display_name || "—";
      const status = row.insertCell();
      status.textContent = statusLabel(consult.status);
      status.className = `status status-${consult.status}`;
      row.insertCell().textContent = consult.duration_s === null ? "" : formatDuration(consult.duration_s);
      const actions = row.insertCell();
      actions.className = "row-actions";
      if (revokedHere.has(consult.id)) {
        const note = document.createElement("span");
        note.className = "revoked";
        note.textContent = ` · ${t("app.list.revoked")}`;
        status.append(note);
      }
      if (consult.status === "created" || consult.status === "active") {
        actions.append(
          button("app.list.open", () => openCall(consult.id)),
          button("app.list.newLink", () => reissue(consult), "secondary"),
          button("app.list.mailLink", () => reissue(consult, askForEmail()), "secondary"),
        );
        if (!revokedHere.has(consult.id)) {
          actions.append(button("app.list.revoke", () => revoke(consult.id), "secondary"));
        }
        actions.append(button("app.list.end", () => endFromList(consult.id), "danger"));
      }
    }
    groups.append(heading, table);
  }
}

function button(key, action, kind = "") {
  const element = document.createElement("button");
  element.type = "button";
  element.className = `small ${kind}`.trim();
  element.textContent = t(key);
  element.addEventListener("click", action);
  return element;
}

let recordings = null;
// Consults whose link was revoked from this page (and not issued anew since):
// the list from the server does not say whether a consult's link is live.
const revokedHere = new Set();

async function loadList() {
  recordings ??= new RecordingsList({
    api,
    table: $("recordings"),
    empty: $("recordings-empty"),
    player: $("player"),
    video: $("player-video"),
    caption: $("player-caption"),
    close: $("player-close"),
    problem: $("recordings-problem"),
  });
  const [data] = await Promise.all([api("GET", "/api/consults"), recordings.load()]);
  renderList(data.consults);
}

function showInvite(data, consult) {
  createdConsultId = consult;
  $("invite-url").value = data.invite_url;
  $("copy-status").textContent = "";
  showMailOutcome($("mail-status"), data);
  $("invite-box").hidden = false;
  $("invite-url").focus();
  $("invite-url").select();
}

async function reissue(consult, body = undefined) {
  const id = consult.id;
  if (body === null) return; // the address was asked for and not given
  if (consult.status === "active" && !confirm(t("app.list.newLinkConfirm"))) return;
  try {
    showInvite(await api("POST", `/api/consults/${id}/invite`, body), id);
    revokedHere.delete(id);
    renderList(lastConsults);
    window.scrollTo({ top: 0, behavior: "smooth" });
  } catch (error) {
    alert(error.message);
  }
}

async function revoke(id) {
  if (!confirm(t("app.list.revokeConfirm"))) return;
  try {
    await api("DELETE", `/api/consults/${id}/invite`);
    if (createdConsultId === id) $("invite-box").hidden = true;
    revokedHere.add(id);
    renderList(lastConsults);
  } catch (error) {
    alert(error.message);
  }
}

async function endFromList(id) {
  if (!confirm(t("app.call.endConfirm"))) return;
  try {
    await api("POST", `/api/consults/${id}/end`);
    await loadList();
  } catch (error) {
    alert(error.message);
  }
}

async function createConsult(event) {
  event.preventDefault();
  $("new-error").textContent = "";
  const body = { guardian_consent: $("minor").checked };
  const name = $("display-name").value.trim();
  if (name) body.display_name = name;
  Object.assign(body, appointmentFields($("new-form")));
  $("new-button").disabled = true;
  try {
    const data = await api("POST", "/api/consults", body);
    showInvite(data, data.consult.id);
    $("display-name").value = "";
    $("minor").checked = false;
    clearAppointmentFields($("new-form"));
    await loadList();
  } catch (error) {
    $("new-error").textContent = error.message;
  } finally {
    $("new-button").disabled = false;
  }
}

async function copyInvite() {
  const url = $("invite-url").value;
  try {
    await navigator.clipboard.writeText(url);
  } catch {
    $("invite-url").select();
    document.execCommand("copy");
  }
  $("copy-status").textContent = t("app.invite.copied");
}

// --- the call -------------------------------------------------------------------

let bannerKey = null;

function banner(key) {
  bannerKey = key || null;
  $("banner").textContent = key ? t(key) : "";
  $("banner").hidden = !key;
}

function patientWaiting(name) {
  $("waiting-text").textContent = name
    ? t("app.call.waitingNamed", { name })
    : t("app.call.waiting");
  $("waiting-notice").hidden = false;
  $("admit").focus();
  chime();
  if (!titleFlash) {
    const original = document.title;
    let on = false;
    titleFlash = {
      original,
      timer: setInterval(() => {
        on = !on;
        document.title = on ? `● ${t("app.call.waitingShort")}` : original;
      }, 1000),
    };
  }
}

function patientNotWaiting() {
  $("waiting-notice").hidden = true;
  if (titleFlash) {
    clearInterval(titleFlash.timer);
    document.title = titleFlash.original;
    titleFlash = null;
  }
}

function refreshDevices() {
  return showDevices(media.stream, $("camera-select"), $("mic-select"), {
    camera: t("common.camera"),
    microphone: t("common.microphone"),
  });
}

function showProblems() {
  if (showDeviceProblems($("device-problem"), media)) $("devices").hidden = false;
}

// Before each (re)connect: is the consult still there, and are we logged in?
// A refused upgrade shows the page only a closed socket (1006), so ask first.
async function therapistSocketUrl(id, scheme) {
  const response = await fetch(`/api/consults/${encodeURIComponent(id)}`, { credentials: "same-origin" });
  lastTouch = Date.now();
  if (response.status === 401) throw new LinkProblem("not_logged_in", "");
  if (response.status === 404) throw new LinkProblem("not_found", "");
  if (!response.ok) throw new Error(`consult: ${response.status}`);
  const { consult } = await response.json();
  if (consult.status === "ended" || consult.status === "not_started") {
    throw new LinkProblem("consult_over", "");
  }
  return `${scheme}//${location.host}/ws?consult=${encodeURIComponent(id)}`;
}

function resetCallControls() {
  for (const [id, key] of [["mute", "call.mute"], ["camera", "call.cameraOff"]]) {
    $(id).setAttribute("aria-pressed", "false");
    $(id).dataset.i18n = key;
    $(id).textContent = t(key);
  }
  $("share").setAttribute("aria-pressed", "false");
  $("share").textContent = t("app.call.share");
  $("quality").dataset.level = "unknown";
  $("quality").textContent = t("quality.unknown");
}

async function openCall(id) {
  if (!webrtcSupported()) {
    alert(t("join.nowebrtc.title"));
    return;
  }
  consultId = id;
  callOver = null;
  const url = new URL(location.href);
  url.searchParams.set("consult", id);
  history.replaceState(null, "", url);
  show("call-view");
  banner("");
  resetCallControls();
  recording.reset();
  patientNotWaiting();
  peerMediaShown(null);
  $("remote-waiting").hidden = false;
  $("remote-waiting").textContent = t("app.call.noPatient");
  media = await getMedia();
  cameraTrack = media.stream ? media.stream.getVideoTracks()[0] || null : null;
  $("local-video").srcObject = media.stream;
  showProblems();
  refreshDevices();
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  call = new ConsultCall({
    role: "therapist",
    socketUrl: () => therapistSocketUrl(id, scheme),
    onEvent: (type, detail) => {
      // Only the current call's events; a finished one may still report.
      if (thisCall === call) onCallEvent(type, detail);
    },
  });
  const thisCall = call;
  call.setLocalStream(media.stream, { camera: media.camera, microphone: media.microphone });
  window.videoconsult = { call };
  call.connect();
}

function onCallEvent(type, detail) {
  switch (type) {
    case "welcome":
      banner("");
      recording.welcome(detail.recording);
      if (detail.state === "waiting" && !detail.peer_present) {
        $("remote-waiting").textContent = t("app.call.noPatient");
      }
      break;
    case "patient-waiting":
      // The room's copy of the label is lost with a restart (one node); the
      // list's, from the database, is not.
      patientWaiting(detail.display_name || labelOf(lastConsults, consultId));
      break;
    case "peer-joined":
      patientNotWaiting();
      $("remote-waiting").textContent = t("call.connecting");
      break;
    case "peer-left":
      patientNotWaiting();
      recording.setConnected(false);
      banner("call.peerLeft.patient");
      peerMediaShown(null);
      $("remote-waiting").hidden = false;
      $("remote-waiting").textContent = t("app.call.noPatient");
      break;
    case "peer-reconnecting":
      banner("call.peerReconnecting.patient");
      break;
    case "peer-rejoined":
      banner("");
      break;
    case "reconnecting":
      banner("call.selfReconnecting");
      break;
    case "protocol-error":
      if (detail.code === "no_patient_waiting") patientNotWaiting();
      recording.error(detail);
      break;
    case "recording":
      recording.update(detail);
      break;
    case "recorder":
      recording.recorderProblem(detail.state);
      break;
    case "remote-stream":
      $("remote-video").srcObject = detail.stream;
      break;
    case "connection":
      $("remote-waiting").hidden = detail.state === "connected";
      if (detail.state === "connected") banner("");
      recording.setConnected(detail.state === "connected");
      break;
    case "quality":
      showQuality($("quality"), detail);
      break;
    case "peer-media":
      peerMediaShown(detail);
      break;
    case "ended":
      // The therapist's own words for the end they made; the neutral ones else.
      closeCall("ended", t(`app.over.${detail.reason}`, {}, t(`ended.${detail.reason}`, {}, "")));
      break;
    case "replaced":
      closeCall("replaced", t("app.over.replaced"));
      break;
    case "session-ended":
      closeCall(null, "");
      toLogin("session");
      break;
    case "left":
      closeCall(null, "");
      backToList();
      break;
    case "link-problem":
      if (detail.code === "not_logged_in") {
        closeCall(null, "");
        toLogin("session");
      } else {
        closeCall("ended", t(detail.code === "not_found" ? "app.over.notFound" : "ended.consult_over"));
      }
      break;
    default:
      break;
  }
}

function closeCall(kind, text) {
  patientNotWaiting();
  recording.reset();
  if (call && !call.finished) call.finish("closed", {});
  stopStream(media.stream);
  if (screenTrack) screenTrack.stop();
  screenTrack = null;
  // A reload of the end page must not open the consult again.
  const url = new URL(location.href);
  url.searchParams.delete("consult");
  history.replaceState(null, "", url);
  media = { stream: null, camera: null, microphone: null };
  for (const video of document.querySelectorAll("video")) video.srcObject = null;
  banner("");
  if (kind) {
    callOver = { kind, text };
    $("call-over-title").textContent = t(kind === "replaced" ? "app.over.replacedTitle" : "app.over.title");
    $("call-over-text").textContent = text;
    show("call-over");
  }
}

function backToList() {
  const url = new URL(location.href);
  url.searchParams.delete("consult");
  history.replaceState(null, "", url);
  consultId = null;
  call = null;
  callOver = null;
  show("dashboard");
  loadList().catch(() => {});
}

async function switchDevice(kind) {
  const select = kind === "video" ? $("camera-select") : $("mic-select");
  const constraints = kind === "video" ? { video: { deviceId: { exact: select.value } } } : { audio: { deviceId: { exact: select.value } } };
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia(constraints);
  } catch (error) {
    $("device-problem").textContent = t(`devices.${kind === "video" ? "camera" : "microphone"}.busy`);
    $("device-problem").hidden = false;
    return;
  }
  const track = stream.getTracks()[0];
  // Muted or camera off stays so with the new device.
  const toggle = kind === "video" ? $("camera") : $("mute");
  track.enabled = toggle.getAttribute("aria-pressed") !== "true";
  const old = media.stream && media.stream.getTracks().find((t2) => t2.kind === kind);
  if (call) {
    await call.replaceTrack(kind, kind === "video" && screenTrack ? screenTrack : track);
    // The recording keeps the camera, even while the screen is shared.
    await call.replaceRecorderTrack(kind, track);
  }
  if (old) {
    media.stream.removeTrack(old);
    old.stop();
  }
  if (!media.stream) media.stream = new MediaStream();
  media.stream.addTrack(track);
  if (kind === "video") cameraTrack = track;
  $("local-video").srcObject = media.stream;
}

async function stopShare() {
  if (!screenTrack) return;
  const track = screenTrack;
  screenTrack = null;
  track.stop();
  $("share").setAttribute("aria-pressed", "false");
  $("share").textContent = t("app.call.share");
  if (call && cameraTrack) await call.replaceTrack("video", cameraTrack);
}

async function toggleShare() {
  if (screenTrack) {
    await stopShare();
    return;
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getDisplayMedia({ video: true });
  } catch {
    return; // the therapist cancelled the picker
  }
  const track = stream.getVideoTracks()[0];
  if (!call || !(await call.replaceTrack("video", track))) {
    track.stop();
    alert(t("app.call.shareNeedsCamera"));
    return;
  }
  screenTrack = track;
  $("share").setAttribute("aria-pressed", "true");
  $("share").textContent = t("app.call.stopShare");
  // The browser's own "Stop sharing" button ends the track.
  track.addEventListener("ended", () => {
    if (screenTrack === track) stopShare();
  });
}

// --- start ----------------------------------------------------------------------

function wire() {
  recording = new RecordingView({ role: "therapist", getCall: () => call });
  $("new-form").addEventListener("submit", createConsult);
  $("copy-invite").addEventListener("click", copyInvite);
  $("open-new").addEventListener("click", () => createdConsultId && openCall(createdConsultId));
  $("logout").addEventListener("click", async () => {
    if (call && !call.finished) call.leave();
    await fetch("/api/logout", { method: "POST", credentials: "same-origin" }).catch(() => {});
    location.assign("/login?reason=logout");
  });
  $("idle-stay").addEventListener("click", () => {
    lastTouch = 0;
    activity();
  });
  $("admit").addEventListener("click", () => {
    call && call.admit();
    patientNotWaiting();
  });
  $("deny").addEventListener("click", () => {
    call && call.deny();
    patientNotWaiting();
  });
  $("end").addEventListener("click", async () => {
    if (!confirm(t("app.call.endConfirm"))) return;
    if (!(call && call.end())) {
      // No socket right now: end it through the API.
      await api("POST", `/api/consults/${consultId}/end`).catch(() => {});
      closeCall("ended", t("app.over.ended_by_therapist"));
    }
  });
  $("back").addEventListener("click", () => {
    if (call && !call.finished) call.leave();
    else backToList();
  });
  $("over-back").addEventListener("click", backToList);
  $("share").addEventListener("click", toggleShare);
  // New permissions or a freed device: open the consult afresh (a reload
  // asks for camera and microphone again and rejoins the same consult).
  $("devices-retry").addEventListener("click", () => location.reload());
  $("devices-toggle").addEventListener("click", () => {
    const open = $("devices").hidden;
    $("devices").hidden = !open;
    $("devices-toggle").setAttribute("aria-expanded", String(open));
  });
  $("camera-select").addEventListener("change", () => switchDevice("video"));
  $("mic-select").addEventListener("change", () => switchDevice("audio"));
  bindCallControls({
    getStream: () => media.stream,
    muteButton: $("mute"),
    cameraButton: $("camera"),
    onChange: () => call && call.sendMediaState(),
  });
  for (const kind of ["pointerdown", "keydown", "touchstart", "wheel"]) {
    window.addEventListener(kind, activity, { passive: true });
  }
  setInterval(checkIdle, 1000);
  if (!navigator.mediaDevices || !navigator.mediaDevices.getDisplayMedia) $("share").hidden = true;
}

async function start() {
  let session;
  try {
    const response = await fetch("/api/session", { credentials: "same-origin" });
    if (response.status === 401) {
      toLogin("login");
      return;
    }
    session = await response.json();
  } catch {
    $("loading").querySelector("p").textContent = t("common.offline");
    setTimeout(start, 3000);
    return;
  }
  account = session.account;
  idleTimeoutS = session.session.idle_timeout_s;
  $("who").textContent = account.email;
  showAccountNotices($("account-notices"), session.notices);
  if (account.role !== "therapist") {
    $("loading").querySelector("p").textContent = t("app.notTherapist");
    showWayHome($("loading-home"), account.role);
    return;
  }
  const wanted = new URLSearchParams(location.search).get("consult");
  if (wanted) {
    await openCall(wanted);
    return;
  }
  show("dashboard");
  try {
    await loadList();
  } catch {
    $("list-empty").hidden = false;
    $("list-empty").textContent = t("common.failed");
  }
}

setupLanguage($("language"), () => {
  translatePage();
  banner(bannerKey);
  if (!$("dashboard").hidden) renderList(lastConsults);
  if (recordings && !$("dashboard").hidden) recordings.render();
  if (callOver) $("call-over-text").textContent = callOver.text;
  peerMediaShown(peerMedia);
});
translatePage();
wire();
start();
