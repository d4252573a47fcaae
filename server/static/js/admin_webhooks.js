// The admin console's webhooks: the endpoints where the practice's record
// system hears of its consults and recordings (register with the events it
// takes; the secret shown once, again after a rotation), each endpoint's
// counts and its recent deliveries and failures, deletion after a
// confirmation. The rules (https, public addresses, ports, at most 10) are the API's;
// its refusals are said here by key, so that they follow the language.
import { say, t } from "./i18n.js";
import "./i18n_admin_integrations.js";
import { $, api, button, confirmAction, copyShown, momentText, option, showProblem } from "./admin_api.js";

const PATH = "/api/admin/webhooks";
// A delivery's status and its words (the keys written out, so that a test finds them).
const STATUS_KEYS = {
  pending: "admin.webhooks.status.pending",
  delivered: "admin.webhooks.status.delivered",
  failed: "admin.webhooks.status.failed",
};
// The forms of a message an endpoint may take, and their words.
const PAYLOAD_KEYS = {
  standard: "admin.webhooks.payload.standard",
  fhir: "admin.webhooks.payload.fhir",
};
// The API names a bad URL in English; these are the refusals an admin can fix.
const URL_PROBLEMS = [
  [/must use https|must start with https|allowed to 127\.0\.0\.1 only/, "admin.webhooks.error.https"],
  [/must not point at this machine/, "admin.webhooks.error.address"],
  [/^port \d+ is not allowed/, "admin.webhooks.error.port"],
  [/user name or password/, "admin.webhooks.error.credentials"],
];

let endpoints = [];
let eventTypes = [];
let shownSecret = null; // { endpoint, secret, rotated }: on the page until "Done"
let opened = null; // { endpoint, deliveries }: the deliveries panel

function eventText(event) {
  return t(`admin.webhooks.event.${event}`, {}, event);
}

function showWebhookProblem(element, error) {
  if (error.status === 409) say(element, "admin.webhooks.error.tooMany");
  else if (error.status === 404) say(element, "admin.webhooks.error.gone");
  else if (error.status === 422) {
    const known = URL_PROBLEMS.find(([pattern]) => pattern.test(error.message));
    if (known) say(element, known[1]);
    else say(element, "admin.error.invalid", { detail: error.message });
  } else showProblem(element, error);
}

function paragraph(text, className = "") {
  const element = document.createElement("p");
  element.textContent = text;
  if (className) element.className = className;
  return element;
}

// --- the list ------------------------------------------------------------------------

async function loadEndpoints() {
  say($("webhooks-error"), "");
  try {
    const answer = await api(PATH);
    endpoints = answer.endpoints;
    eventTypes = answer.event_types;
  } catch (error) {
    showWebhookProblem($("webhooks-error"), error);
    return;
  }
  renderEndpoints();
  renderEventChoices();
}

function renderEndpoints() {
  const list = $("endpoint-list");
  list.replaceChildren();
  for (const endpoint of endpoints) {
    const item = document.createElement("li");
    item.className = "endpoint";
    item.dataset.endpoint = endpoint.id;
    item.dataset.url = endpoint.url;
    const url = document.createElement("code");
    url.className = "endpoint-url";
    url.textContent = endpoint.url;
    item.append(url);
    item.append(paragraph(t("admin.webhooks.events", { events: endpoint.events.map(eventText).join("; ") }), "note"));
    const payload = t(PAYLOAD_KEYS[endpoint.payload] || "", {}, endpoint.payload);
    item.append(paragraph(t("admin.webhooks.format", { payload }), "note"));
    const counts = paragraph(t("admin.webhooks.counts", endpoint.deliveries), "endpoint-counts");
    counts.classList.toggle("has-failures", endpoint.deliveries.failed > 0);
    item.append(counts);
    const overlapUntil = endpoint.previous_secret_expires_at;
    if (overlapUntil && new Date(overlapUntil) > new Date()) {
      item.append(paragraph(t("admin.webhooks.overlap", { at: momentText(overlapUntil) }), "note"));
    }
    const actions = document.createElement("div");
    actions.className = "row-actions";
    const named = { url: endpoint.url };
    actions.append(
      button("admin.webhooks.deliveries", () => openDeliveries(endpoint), {
        label: t("admin.webhooks.deliveriesLabel", named),
      }),
      button("admin.webhooks.rotate", () => rotate(endpoint), { label: t("admin.webhooks.rotateLabel", named) }),
      button("admin.webhooks.delete", () => remove(endpoint), {
        danger: true,
        label: t("admin.webhooks.deleteLabel", named),
      }),
    );
    item.append(actions);
    list.append(item);
  }
  $("endpoint-list").hidden = endpoints.length === 0;
  $("endpoints-empty").hidden = endpoints.length > 0;
}

// --- register ------------------------------------------------------------------------

function renderEventChoices() {
  const box = $("webhook-events");
  const known = new Set([...box.querySelectorAll("input")].map((input) => input.value));
  const checked = new Set([...box.querySelectorAll("input:checked")].map((input) => input.value));
  for (const line of box.querySelectorAll("p")) line.remove(); // the legend stays
  for (const event of eventTypes) {
    const line = document.createElement("p");
    line.className = "check";
    const input = document.createElement("input");
    input.type = "checkbox";
    input.id = `webhook-event-${event.replace(".", "-")}`;
    input.value = event;
    input.checked = !known.has(event) || checked.has(event); // new choices start ticked
    const label = document.createElement("label");
    label.htmlFor = input.id;
    label.textContent = `${eventText(event)} `;
    const code = document.createElement("code");
    code.textContent = event;
    label.append(code);
    line.append(input, label);
    box.append(line);
  }
}

async function register(event) {
  event.preventDefault();
  const url = $("webhook-url").value.trim();
  const events = [...$("webhook-events").querySelectorAll("input:checked")].map((input) => input.value);
  say($("webhook-error"), "");
  if (!url) return say($("webhook-error"), "admin.webhooks.missingUrl");
  if (events.length === 0) return say($("webhook-error"), "admin.webhooks.missingEvents");
  $("webhook-register").disabled = true;
  try {
    const body = { url, events, payload: $("webhook-payload").value };
    const created = await api(PATH, { method: "POST", body });
    $("webhook-url").value = "";
    $("webhook-payload").value = "standard";
    for (const input of $("webhook-events").querySelectorAll("input")) input.checked = true;
    showSecret(created, false);
    await loadEndpoints();
  } catch (error) {
    showWebhookProblem($("webhook-error"), error);
  } finally {
    $("webhook-register").disabled = false;
  }
}

// --- the secret, shown once ------------------------------------------------------------

function showSecret({ endpoint, secret }, rotated) {
  shownSecret = { endpoint, secret, rotated };
  renderSecret();
  say($("secret-copy-status"), "");
  $("secret-box").hidden = false;
  $("secret-box").scrollIntoView({ block: "nearest" });
  $("secret-heading").focus();
}

function renderSecret() {
  if (!shownSecret) return;
  const { endpoint, secret, rotated } = shownSecret;
  say($("secret-heading"), rotated ? "admin.webhooks.secretRotated" : "admin.webhooks.secretCreated", {
    url: endpoint.url,
  });
  $("secret-value").value = secret;
  $("secret-overlap").hidden = !rotated;
  if (rotated) {
    say($("secret-overlap"), "admin.webhooks.secretOverlap", { at: momentText(endpoint.previous_secret_expires_at) });
  }
}

// Keyboard focus back on the endpoint's first button, once a box about it closes.
function focusEndpoint(endpointId) {
  const first = $("endpoint-list").querySelector(`li[data-endpoint="${endpointId}"] button`);
  if (first) first.focus();
}

function closeSecret() {
  // Gone from the page too: the secret is shown once.
  const endpointId = shownSecret && shownSecret.endpoint.id;
  shownSecret = null;
  $("secret-value").value = "";
  $("secret-box").hidden = true;
  focusEndpoint(endpointId);
}

function copySecret() {
  return copyShown($("secret-value"), $("secret-copy-status"), {
    copied: "admin.webhooks.copied",
    byHand: "admin.webhooks.copyByHand",
  });
}

async function rotate(endpoint) {
  const sure = await confirmAction({
    title: t("admin.webhooks.confirmRotateTitle", { url: endpoint.url }),
    text: t("admin.webhooks.confirmRotateText"),
    yes: t("admin.webhooks.confirmRotateYes"),
  });
  if (!sure) return;
  say($("webhooks-error"), "");
  try {
    showSecret(await api(`${PATH}/${endpoint.id}/rotate-secret`, { method: "POST" }), true);
  } catch (error) {
    showWebhookProblem($("webhooks-error"), error);
  }
  await loadEndpoints();
}

async function remove(endpoint) {
  const sure = await confirmAction({
    title: t("admin.webhooks.confirmDeleteTitle", { url: endpoint.url }),
    text: t("admin.webhooks.confirmDeleteText"),
    yes: t("admin.webhooks.delete"),
  });
  if (!sure) return;
  say($("webhooks-error"), "");
  try {
    await api(`${PATH}/${endpoint.id}`, { method: "DELETE" });
  } catch (error) {
    showWebhookProblem($("webhooks-error"), error);
  }
  if (opened && opened.endpoint.id === endpoint.id) closeDeliveries();
  if (shownSecret && shownSecret.endpoint.id === endpoint.id) closeSecret();
  await loadEndpoints();
}

// --- deliveries --------------------------------------------------------------------------

async function openDeliveries(endpoint) {
  opened = { endpoint, deliveries: null };
  $("delivery-status").value = "";
  $("deliveries-box").hidden = false;
  renderDeliveries();
  $("deliveries-heading").focus();
  await loadDeliveries();
}

async function loadDeliveries(event) {
  if (event) event.preventDefault();
  if (!opened) return;
  say($("deliveries-error"), "");
  const status = $("delivery-status").value;
  const query = status ? `?${new URLSearchParams({ status })}` : "";
  try {
    opened.deliveries = (await api(`${PATH}/${opened.endpoint.id}/deliveries${query}`)).deliveries;
  } catch (error) {
    showWebhookProblem($("deliveries-error"), error);
    return;
  }
  renderDeliveries();
  if (event) await loadEndpoints(); // "Refresh": the counts too
}

function answerText(delivery) {
  if (delivery.last_status_code !== null) return t("admin.webhooks.http", { code: delivery.last_status_code });
  return delivery.last_error || t("admin.webhooks.notTried");
}

function statusText(delivery) {
  const words = t(STATUS_KEYS[delivery.status] || "", {}, delivery.status);
  if (delivery.status !== "pending" || !delivery.next_attempt_at) return words;
  return `${words}; ${t("admin.webhooks.nextTry", { at: momentText(delivery.next_attempt_at) })}`;
}

function renderDeliveries() {
  if (!opened) return;
  say($("deliveries-heading"), "admin.webhooks.deliveriesLabel", { url: opened.endpoint.url });
  const rows = $("delivery-rows");
  rows.replaceChildren();
  const found = opened.deliveries || [];
  for (const delivery of found) {
    const row = rows.insertRow();
    row.dataset.webhookId = delivery.webhook_id;
    row.dataset.status = delivery.status;
    const cells = [
      ["admin.webhooks.col.event", eventText(delivery.event)],
      ["admin.webhooks.col.subject", delivery.subject_id],
      ["admin.webhooks.col.when", momentText(delivery.event_at)],
      ["admin.webhooks.col.attempts", String(delivery.attempts)],
      ["admin.webhooks.col.answer", answerText(delivery)],
      ["admin.webhooks.col.status", statusText(delivery)],
    ];
    for (const [label, text] of cells) {
      const cell = row.insertCell();
      cell.dataset.label = t(label);
      cell.textContent = text;
    }
    row.cells[1].className = "id";
    row.cells[5].className = `delivery-${delivery.status}`;
  }
  $("delivery-table").hidden = found.length === 0;
  $("deliveries-empty").hidden = opened.deliveries === null || found.length > 0;
}

function closeDeliveries() {
  const endpointId = opened && opened.endpoint.id;
  opened = null;
  $("deliveries-box").hidden = true;
  $("delivery-rows").replaceChildren();
  focusEndpoint(endpointId);
}

function fillPayloadSelect() {
  const select = $("webhook-payload");
  const chosen = select.value || "standard";
  select.replaceChildren(...Object.entries(PAYLOAD_KEYS).map(([payload, key]) => option(payload, t(key))));
  select.value = chosen;
}

function fillStatusSelect() {
  const select = $("delivery-status");
  const chosen = select.value;
  select.replaceChildren(option("", t("admin.webhooks.allStatuses")));
  for (const [status, key] of Object.entries(STATUS_KEYS)) select.append(option(status, t(key)));
  select.value = chosen;
}

// --- the page's part ----------------------------------------------------------------------

// Shown again in the page's (new) language.
export function renderWebhooks() {
  fillStatusSelect();
  fillPayloadSelect();
  renderEndpoints();
  renderEventChoices();
  renderSecret();
  renderDeliveries();
}

export function wireWebhooks() {
  fillStatusSelect();
  fillPayloadSelect();
  $("webhook-form").addEventListener("submit", register);
  $("copy-secret").addEventListener("click", copySecret);
  $("close-secret").addEventListener("click", closeSecret);
  $("deliveries-filter").addEventListener("submit", loadDeliveries);
  $("delivery-status").addEventListener("change", () => loadDeliveries());
  $("close-deliveries").addEventListener("click", closeDeliveries);
}

export async function startWebhooks() {
  await loadEndpoints();
}
