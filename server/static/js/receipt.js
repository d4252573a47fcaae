// The patient's receipt at /receipt/<token>: the consultation's times, its
// recording, and who looked at its record. No inline script (CSP).
import { setupLanguage, t, translatePage } from "./i18n.js";
import "./i18n_receipt.js";

const token = decodeURIComponent(location.pathname.split("/").pop() || "");
const $ = (id) => document.getElementById(id);
let receipt = null;
let shown = "loading";

function show(id) {
  shown = id;
  for (const section of document.querySelectorAll("main > section")) {
    section.hidden = section.id !== id;
  }
}

// The browser's own locale where it speaks the page's language (en-GB: a
// 24-hour clock), else the page's language.
function locale() {
  const current = document.documentElement.lang;
  for (const tag of navigator.languages || [navigator.language || current]) {
    if (tag.toLowerCase().split("-")[0] === current) return tag;
  }
  return current;
}

function when(iso, options) {
  if (!iso) return t("receipt.consult.none");
  return new Intl.DateTimeFormat(locale(), options).format(new Date(iso));
}

const DATE = { weekday: "long", day: "numeric", month: "long", year: "numeric" };
const TIME = { hour: "2-digit", minute: "2-digit", second: "2-digit" };
const MOMENT = { day: "numeric", month: "short", year: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit" };

function duration(seconds) {
  if (seconds === null || seconds === undefined) return t("receipt.consult.none");
  return t("receipt.minutes", { minutes: Math.floor(seconds / 60), seconds: seconds % 60 });
}

function render() {
  const { consult, recording, accesses } = receipt;
  $("consult-date").textContent = when(consult.started_at || consult.ended_at, DATE);
  $("consult-start").textContent = when(consult.started_at, TIME);
  $("consult-end").textContent = when(consult.ended_at, TIME);
  $("consult-duration").textContent = duration(consult.duration_s);
  $("consult-status").textContent = t(`receipt.status.${consult.status}`, {}, consult.status);
  const recorded = !recording.recorded ? "none" : recording.exists ? "exists" : "gone";
  $("recording-text").textContent = t(`receipt.recording.${recorded}`);
  const rows = $("access-rows");
  rows.replaceChildren();
  for (const access of accesses) {
    const row = rows.insertRow();
    row.insertCell().textContent = when(access.at, MOMENT);
    row.insertCell().textContent = t(`receipt.role.${access.role}`, {}, access.role);
    const who = row.insertCell();
    if (access.pseudonym) {
      who.textContent = access.pseudonym;
      who.classList.add("pseudonym");
    } else {
      who.textContent = t(access.role === "patient" ? "receipt.access.you" : "receipt.access.nobody");
    }
    row.insertCell().textContent = t(`receipt.action.${access.action}`, {}, access.action);
    row.insertCell().textContent = t(`receipt.outcome.${access.outcome}`, {}, access.outcome);
  }
  $("truncated").hidden = !receipt.truncated;
  $("truncated").textContent = t("receipt.access.truncated", { count: accesses.length });
}

async function load() {
  let response;
  try {
    response = await fetch(`/api/receipts/${encodeURIComponent(token)}`, { credentials: "same-origin" });
  } catch {
    show("failed");
    return;
  }
  if (response.status === 404) {
    show("unknown");
    return;
  }
  if (!response.ok) {
    show("failed");
    return;
  }
  receipt = await response.json();
  render();
  show("receipt");
}

setupLanguage($("language"), () => {
  translatePage();
  if (receipt) render();
  show(shown);
});
translatePage();
load();
