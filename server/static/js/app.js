// The therapist's app at /app: consults list, new consult with its invite
// link, the call view, logout and the idle timeout.
import {
  appointmentFields,
  askForEmail,
  clearAppointmentFields,
  consultTime,
  labelOf,
  offerReference,
  showMailOutcome,
  startOfDay,
} from "./appointments.js";
import { ConsultCall, LinkProblem } from "./call.js";
import { renderConsults } from "./consult_list.js";
import { say, setupLanguage, t, translatePage } from "./i18n.js";
import { IdleWatch } from "./idle.js";
import { chime, getMedia, showDevices, stopStream, webrtcSupported } from "./media.js";
import { RecordingView } from "./recording.js";
import { PagedList } from "./pages.js";
import { RecordingsList } from "./recordings.js";
import { showWayHome } from "./roles.js";
import { openSession, wireLogout } from "./session.js";
import { TrackSwitcher } from "./share.js";
import {
  bindCallControls,
  showDeviceProblems,
  showPeerMedia,
  showQuality,
  showSection,
  toLogin,
} from "./ui.js";

const $ = (id) => document.getElementById(id);

let account = null;
let call = null;
let consultId = null;
let media = { stream: null, camera: null, microphone: null };
let createdConsultId = null;
let titleFlash = null;
let lastConsults = [];
let recording = null;
let peerMedia = null;
const tracks = new TrackSwitcher({ getCall: () => call, getMedia: () => media });
const idle = new IdleWatch({
  inCall: () => Boolean(call && !call.finished),
  touch: () => api("POST", "/api/session/touch"),
});

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
  if (response.status === 401) {
    toLogin("session");
    throw new Error("not logged in");
  }
  const data = response.status === 204 ? {} : await response.json().catch(() => ({}));
  if (!response.ok) {
    const code = data.error && data.error.code;
    // In the page's language where we know the code; the server's words otherwise.
    const fallback = (data.error && data.error.message) || t("common.failed");
    // A refused field is named in the message ("field 'email': ..."); where the
    // page has words for that field's problem, those.
    const field = /^field '(\w+)'/.exec(fallback)?.[1];
    const specific = field && t(`apiError.${code}.${field}`, {}, "") ? `apiError.${code}.${field}` : "";
    const key = specific || `apiError.${code}`;
    const error = new Error(t(key, {}, fallback));
    error.code = code;
    error.key = key;
    error.fallback = fallback;
    throw error;
  }
  return data;
}

const show = showSection;

// --- the list -----------------------------------------------------------------

function renderList(consults) {
  lastConsults = consults;
  renderConsults($("list-groups"), $("list-empty"), consults, {
    open: (consult) => openCall(consult.id),
    newLink: (consult) => reissue(consult),
    mailLink: (consult) => reissue(consult, askForEmail()),
    revoke: (consult) => revoke(consult.id),
    end: (consult) => endFromList(consult.id),
  });
}

let recordings = null;
let consultPages = null;

// The row as the server would now list it, until the list is loaded again.
function linkNow(id, link) {
  consultPages.show(lastConsults.map((consult) => (consult.id === id ? { ...consult, link } : consult)));
}

async function loadList() {
  recordings ??= new RecordingsList({
    api,
    table: $("recordings"),
    empty: $("recordings-empty"),
    older: $("recordings-older"),
    player: $("player"),
    video: $("player-video"),
    caption: $("player-caption"),
    close: $("player-close"),
    problem: $("recordings-problem"),
  });
  // By time, latest first, a page at a time: read on until every consult
  // from the start of today is there, however many were made since.
  consultPages ??= new PagedList({
    api,
    path: "/api/consults",
    field: "consults",
    older: $("consults-older"),
    problem: $("consults-problem"),
    render: renderList,
    focus: $("list-groups"),
    more: (consults) => consults.length > 0 && consultTime(consults.at(-1)) >= startOfDay(),
  });
  await Promise.all([consultPages.load(), recordings.load()]);
}

function showInvite(data, consult) {
  createdConsultId = consult;
  $("invite-url").value = data.invite_url;
  say($("copy-status"), "");
  showMailOutcome($("mail-status"), data);
  $("invite-box").hidden = false;
  $("invite-url").focus();
  $("invite-url").select();
}

async function reissue(consult, body = undefined) {
  const id = consult.id;
  if (body === null) return; // the address was asked for and not given
  // Either way the old link stops working: a running consult's patient needs
  // the new one to come back, a waiting patient is sent away.
  const question = consult.status === "active" ? "app.list.newLinkConfirm" : "app.list.newLinkConfirmWaiting";
  if (!confirm(t(question))) return;
  try {
    showInvite(await api("POST", `/api/consults/${id}/invite`, body), id);
    linkNow(id, "live");
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
    linkNow(id, "revoked");
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
  say($("new-error"), "");
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
    // A known refusal in the page's language (again in another when it changes).
    if (error.code) say($("new-error"), error.key, {}, error.fallback);
    else say($("new-error"), "common.offline");
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
  say($("copy-status"), "app.invite.copied");
}

// --- the call -------------------------------------------------------------------

let bannerKey = null;

function banner(key) {
  bannerKey = key || null;
  $("banner").textContent = key ? t(key) : "";
  $("banner").hidden = !key;
}

// The page's own title, in the language it has now.
function pageTitle() {
  const title = document.querySelector("title[data-i18n]");
  return title ? t(title.dataset.i18n) : document.title;
}

function patientWaiting(name) {
  if (name) say($("waiting-text"), "app.call.waitingNamed", { name });
  else say($("waiting-text"), "app.call.waiting");
  $("waiting-notice").hidden = false;
  $("admit").focus();
  chime();
  if (!titleFlash) {
    let on = false;
    titleFlash = {
      timer: setInterval(() => {
        on = !on;
        document.title = on ? `● ${t("app.call.waitingShort")}` : pageTitle();
      }, 1000),
    };
  }
}

function patientNotWaiting() {
  $("waiting-notice").hidden = true;
  if (titleFlash) {
    clearInterval(titleFlash.timer);
    document.title = pageTitle();
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
    say($(id), key);
  }
  $("share").setAttribute("aria-pressed", "false");
  say($("share"), "app.call.share");
  $("quality").dataset.level = "unknown";
  say($("quality"), "quality.unknown");
}

async function openCall(id) {
  if (!webrtcSupported()) {
    alert(t("join.nowebrtc.title"));
    return;
  }
  consultId = id;
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
  say($("remote-waiting"), "app.call.noPatient");
  media = await getMedia();
  tracks.start(media.stream);
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
        say($("remote-waiting"), "app.call.noPatient");
      }
      break;
    case "patient-waiting":
      // The room's copy of the label is lost with a restart (one node); the
      // list's, from the database, is not.
      patientWaiting(detail.display_name || labelOf(lastConsults, consultId));
      break;
    case "peer-joined":
      patientNotWaiting();
      say($("remote-waiting"), "call.connecting");
      break;
    case "peer-left":
      patientNotWaiting();
      recording.setConnected(false);
      banner("call.peerLeft.patient");
      peerMediaShown(null);
      $("remote-waiting").hidden = false;
      say($("remote-waiting"), "app.call.noPatient");
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
      closeCall("ended", t(`app.over.${detail.reason}`, {}, null) === null ? `ended.${detail.reason}` : `app.over.${detail.reason}`);
      break;
    case "replaced":
      closeCall("replaced", "app.over.replaced");
      break;
    case "session-ended":
      // To the login first, while the address still names the consult: after
      // logging in again the therapist is back in it ("next").
      toLogin("session");
      closeCall(null);
      break;
    case "left":
      closeCall(null);
      backToList();
      break;
    case "link-problem":
      if (detail.code === "not_logged_in") {
        toLogin("session");
        closeCall(null);
      } else {
        closeCall("ended", detail.code === "not_found" ? "app.over.notFound" : "ended.consult_over");
      }
      break;
    default:
      break;
  }
}

// kind: "ended" or "replaced" shows the end page with the text of ``key``;
// null just closes.
function closeCall(kind, key) {
  patientNotWaiting();
  recording.reset();
  if (call && !call.finished) call.finish("closed", {});
  stopStream(media.stream);
  tracks.stop();
  // A reload of the end page must not open the consult again.
  const url = new URL(location.href);
  url.searchParams.delete("consult");
  history.replaceState(null, "", url);
  media = { stream: null, camera: null, microphone: null };
  for (const video of document.querySelectorAll("video")) video.srcObject = null;
  banner("");
  if (kind) {
    say($("call-over-title"), kind === "replaced" ? "app.over.replacedTitle" : "app.over.title");
    say($("call-over-text"), key, {}, "");
    show("call-over");
    // Where a keyboard or screen-reader user goes on from, as on the patient's page.
    const title = $("call-over-title");
    title.tabIndex = -1;
    title.focus({ preventScroll: true });
  }
}

function backToList() {
  const url = new URL(location.href);
  url.searchParams.delete("consult");
  history.replaceState(null, "", url);
  consultId = null;
  call = null;
  show("dashboard");
  loadList().catch(() => {});
}

// --- start ----------------------------------------------------------------------

function wire() {
  recording = new RecordingView({ role: "therapist", getCall: () => call });
  $("new-form").addEventListener("submit", createConsult);
  $("copy-invite").addEventListener("click", copyInvite);
  $("open-new").addEventListener("click", () => createdConsultId && openCall(createdConsultId));
  wireLogout(() => {
    if (call && !call.finished) call.leave();
  });
  $("idle-stay").addEventListener("click", () => idle.stay());
  // A new login, between calls, before this one runs out (a call open now ends).
  $("session-end-login").addEventListener("click", () => $("logout").click());
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
      // No socket right now: end it through the API. The call stops first,
      // so that a connect on its way (its consult checked before the end)
      // opens no socket to a consult that is over.
      if (call && !call.finished) call.finish("closed", {});
      await api("POST", `/api/consults/${consultId}/end`).catch(() => {});
      closeCall("ended", "app.over.ended_by_therapist");
    }
  });
  $("back").addEventListener("click", () => {
    if (call && !call.finished) call.leave();
    else backToList();
  });
  $("over-back").addEventListener("click", backToList);
  $("share").addEventListener("click", () => tracks.toggleShare());
  // New permissions or a freed device: open the consult afresh (a reload
  // asks for camera and microphone again and rejoins the same consult).
  $("devices-retry").addEventListener("click", () => location.reload());
  $("devices-toggle").addEventListener("click", () => {
    const open = $("devices").hidden;
    $("devices").hidden = !open;
    $("devices-toggle").setAttribute("aria-expanded", String(open));
  });
  $("camera-select").addEventListener("change", () => tracks.switchDevice("video"));
  $("mic-select").addEventListener("change", () => tracks.switchDevice("audio"));
  bindCallControls({
    getStream: () => media.stream,
    muteButton: $("mute"),
    cameraButton: $("camera"),
    onChange: () => call && call.sendMediaState(),
  });
  idle.watch();
  if (!navigator.mediaDevices || !navigator.mediaDevices.getDisplayMedia) $("share").hidden = true;
}

async function start() {
  const session = await openSession();
  if (!session) return;
  account = session.account;
  idle.timeoutS = session.session.idle_timeout_s;
  idle.loginEndsIn(session.session.absolute_end_in_s);
  idle.keepAlive(); // the server's idle clock from now: the countdown's start
  offerReference($("new-form"), session.practice);
  if (account.role !== "therapist") {
    say($("loading").querySelector("p"), "app.notTherapist");
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
    say($("list-empty"), "common.failed");
  }
}

setupLanguage($("language"), () => {
  translatePage();
  banner(bannerKey);
  if (!$("dashboard").hidden) renderList(lastConsults);
  if (recordings && !$("dashboard").hidden) recordings.render();
  if (!$("device-problem").dataset.i18n) showDeviceProblems($("device-problem"), media);
  peerMediaShown(peerMedia);
});
translatePage();
wire();
start();
