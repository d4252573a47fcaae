// An account's external id (the practice's record-system id for the person)
// in the admin console: shown in the accounts list, set, changed or cleared in
// a small dialog. The API checks it (1 to 64 printable characters, unique in
// the practice); this page says its refusals in the page's language.
import { say, t } from "./i18n.js";
import { $, api, button, showProblem } from "./admin_api.js";

let editing = null;
let onChanged = () => {};

// The list's cell: the id (or a dash) and, but in the admin's own row (which
// has no actions), the button that opens the dialog.
export function fillExternalIdCell(element, account, { editable = true } = {}) {
  const shown = document.createElement("span");
  shown.className = "external-id";
  shown.textContent = account.external_id || "—";
  element.append(shown);
  if (!editable) return;
  const key = account.external_id ? "admin.action.changeExternalId" : "admin.action.setExternalId";
  const label = t("admin.action.externalIdLabel", { email: account.email });
  element.append(" ", button(key, () => openDialog(account), { label }));
}

function openDialog(account) {
  editing = account;
  say($("external-id-title"), "admin.externalId.title", { email: account.email });
  say($("external-id-error"), "");
  $("external-id-input").value = account.external_id || "";
  $("external-id-dialog").showModal();
  $("external-id-input").focus();
}

function closeDialog() {
  editing = null;
  if ($("external-id-dialog").open) $("external-id-dialog").close();
}

async function save(event) {
  event.preventDefault();
  if (!editing) return;
  const value = $("external-id-input").value.trim();
  say($("external-id-error"), "");
  $("external-id-save").disabled = true;
  try {
    const path = `/api/admin/accounts/${editing.id}/external-id`;
    const answer = await api(path, { method: "PUT", body: { external_id: value || null } });
    closeDialog();
    onChanged(answer.account);
  } catch (error) {
    // Said here rather than by showProblem: a 409 here is a taken id, not an address.
    if (error.status === 409) say($("external-id-error"), "admin.externalId.taken");
    else if (error.status === 422) say($("external-id-error"), "admin.externalId.invalid");
    else showProblem($("external-id-error"), error);
  } finally {
    $("external-id-save").disabled = false;
  }
}

// ``changed(account)`` is told the account as the API answered it.
export function wireExternalId(changed) {
  onChanged = changed;
  $("external-id-form").addEventListener("submit", save);
  $("external-id-cancel").addEventListener("click", closeDialog);
  $("external-id-dialog").addEventListener("close", () => {
    editing = null;
  });
}
